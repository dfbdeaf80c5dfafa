//! A deterministic in-process cluster for tests, in the manner of raft-rs's
//! `harness/src/network.rs`: N [`ReplicaNode`]s, a simulated network whose messages are
//! delivered in a fixed order (FIFO by send time), links that can be dropped (with a seeded
//! RNG), cut, isolated or delayed, and a simulated clock advanced only by [`Cluster::tick`].
//!
//! One thing is not under the harness's control: raft-rs draws each replica's randomized
//! election timeout from its own thread RNG, so *which* replica wins an election may differ
//! between runs. Tests therefore assert on properties (one leader, higher term, identical
//! states), never on a particular winner.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use raft::ReadState;
use raft::eraftpb::{Message, MessageType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::node::{Applied, ReplicaConfig, ReplicaNode};
use super::redb_store::RedbLogStore;
use super::store::{LogStore, MemLogStore};
use crate::{Actor, Command, Entry, Result, Role, WriteId};

/// Milliseconds the simulated clock moves per tick.
pub const TICK_MS: u64 = 100;

/// A simulated cluster of coordinator replicas.
pub struct Cluster<S: LogStore = MemLogStore> {
    pub nodes: BTreeMap<u64, ReplicaNode<S>>,
    /// Every normal entry each replica applied, in order.
    pub applied: BTreeMap<u64, Vec<Applied>>,
    /// Every ReadIndex answer each replica got.
    pub read_states: BTreeMap<u64, Vec<ReadState>>,
    /// Every entry each replica applied, of any kind, as (index, context), in order
    /// ([`ReadyOutput::entries`](super::node::ReadyOutput::entries)).
    pub seen: BTreeMap<u64, Vec<(u64, Vec<u8>)>>,
    /// Messages in flight: (tick at which to deliver, message), in send order.
    queue: VecDeque<(u64, Message)>,
    /// Links (from, to) that drop messages with this probability.
    drops: BTreeMap<(u64, u64), f64>,
    /// Links (from, to) whose messages arrive this many ticks late.
    delays: BTreeMap<(u64, u64), u64>,
    rng: StdRng,
    config: ReplicaConfig,
    logger: slog::Logger,
    /// Ticks since the start.
    pub ticks: u64,
    /// The simulated wall clock, in ms since the Unix epoch.
    pub now_ms: u64,
}

impl Cluster<MemLogStore> {
    /// `n` replicas (ids 1..=n) that bootstrap together; drops draw from a RNG seeded `seed`.
    pub fn new(n: u64, seed: u64, snapshot_every: u64) -> Cluster {
        let voters: Vec<u64> = (1..=n).collect();
        let mut cluster = Cluster::empty(seed, snapshot_every);
        for id in 1..=n {
            cluster.start(id, MemLogStore::with_voters(&voters));
        }
        cluster
    }

    /// Starts a new, empty replica `id` that will join once a leader adds it.
    pub fn add_replica(&mut self, id: u64) {
        self.start(id, MemLogStore::new());
    }
}

impl Cluster<RedbLogStore> {
    /// `n` replicas that bootstrap together, each with a durable store in `dir/replica-<id>.redb`.
    pub fn durable(n: u64, seed: u64, snapshot_every: u64, dir: &std::path::Path) -> Self {
        let voters: Vec<u64> = (1..=n).collect();
        let mut cluster = Cluster::empty(seed, snapshot_every);
        for id in 1..=n {
            let store = RedbLogStore::bootstrap(Self::store_path(dir, id), &voters)
                .expect("open the replica's store");
            cluster.start(id, store);
        }
        cluster
    }

    fn store_path(dir: &std::path::Path, id: u64) -> std::path::PathBuf {
        dir.join(format!("replica-{id}.redb"))
    }

    /// Crashes replica `id`: drops it without any shutdown, as `kill -9` would. Its messages
    /// in flight stay in the network; it returns the path of its store.
    pub fn crash(&mut self, id: u64) -> std::path::PathBuf {
        let node = self.nodes.remove(&id).expect("a running replica");
        let path = node.store().path().to_path_buf();
        drop(node);
        path
    }

    /// Restarts replica `id` from the store it left at `path`.
    pub fn restart(&mut self, id: u64, path: &std::path::Path) {
        let store = RedbLogStore::open(path).expect("reopen the replica's store");
        let config = ReplicaConfig {
            id,
            ..self.config.clone()
        };
        let node = ReplicaNode::restart(&config, store, &self.logger).expect("restart the replica");
        self.nodes.insert(id, node);
    }
}

impl<S: LogStore> Cluster<S> {
    fn empty(seed: u64, snapshot_every: u64) -> Cluster<S> {
        let config = ReplicaConfig {
            snapshot_every,
            ..ReplicaConfig::default()
        };
        Cluster {
            nodes: BTreeMap::new(),
            applied: BTreeMap::new(),
            read_states: BTreeMap::new(),
            seen: BTreeMap::new(),
            queue: VecDeque::new(),
            drops: BTreeMap::new(),
            delays: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed),
            config,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            ticks: 0,
            now_ms: 1_700_000_000_000,
        }
    }

    fn start(&mut self, id: u64, store: S) {
        let config = ReplicaConfig {
            id,
            ..self.config.clone()
        };
        let node = ReplicaNode::new(&config, store, &self.logger).expect("valid replica config");
        self.nodes.insert(id, node);
        self.applied.entry(id).or_default();
        self.read_states.entry(id).or_default();
        self.seen.entry(id).or_default();
    }

    /// Drops messages from `from` to `to` with probability `ratio` (1.0: all).
    pub fn drop(&mut self, from: u64, to: u64, ratio: f64) {
        self.drops.insert((from, to), ratio);
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn cut(&mut self, a: u64, b: u64) {
        self.drop(a, b, 1.0);
        self.drop(b, a, 1.0);
    }

    /// Cuts `id` off from every other replica.
    pub fn isolate(&mut self, id: u64) {
        let others: Vec<u64> = self.nodes.keys().copied().filter(|&o| o != id).collect();
        for other in others {
            self.cut(id, other);
        }
    }

    /// Makes messages from `from` to `to` arrive `ticks` ticks late.
    pub fn delay(&mut self, from: u64, to: u64, ticks: u64) {
        self.delays.insert((from, to), ticks);
    }

    /// Heals every link: no drops, no delays.
    pub fn recover(&mut self) {
        self.drops.clear();
        self.delays.clear();
    }

    fn send(&mut self, messages: Vec<Message>) {
        for msg in messages {
            let link = (msg.from, msg.to);
            let ratio = self.drops.get(&link).copied().unwrap_or(0.0);
            if ratio > 0.0 && self.rng.gen_range(0.0..1.0) < ratio {
                // Like a transport, report the loss of a snapshot so the leader resends it.
                if msg.get_msg_type() == MessageType::MsgSnapshot
                    && let Some(sender) = self.nodes.get_mut(&msg.from)
                {
                    sender.report_snapshot(msg.to, false);
                }
                continue;
            }
            let at = self.ticks + self.delays.get(&link).copied().unwrap_or(0);
            self.queue.push_back((at, msg));
        }
    }

    /// Runs every replica's ready loop and delivers due messages until nothing moves.
    pub fn process(&mut self) {
        for _round in 0..10_000 {
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            let mut moved = false;
            for id in ids {
                let Some(node) = self.nodes.get_mut(&id) else {
                    continue;
                };
                let out = node.handle_ready().expect("ready loop");
                moved |= !out.messages.is_empty() || !out.applied.is_empty();
                self.seen.entry(id).or_default().extend(out.entries);
                self.applied.entry(id).or_default().extend(out.applied);
                self.read_states
                    .entry(id)
                    .or_default()
                    .extend(out.read_states);
                self.send(out.messages);
            }
            // Deliver every due message once, in send order; later ones wait in the queue.
            let now = self.ticks;
            let (due, later): (VecDeque<_>, VecDeque<_>) =
                self.queue.drain(..).partition(|(at, _)| *at <= now);
            self.queue = later;
            for (_, msg) in due {
                moved = true;
                let (from, to) = (msg.from, msg.to);
                let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
                // A stale or misdirected message is refused by raft; the network ignores it.
                let delivered = match self.nodes.get_mut(&to) {
                    Some(node) => node.step(msg).is_ok(),
                    None => false,
                };
                // Like a transport, tell the leader how a snapshot went: its progress for the
                // peer stays paused until then (the peer's reply may be lost).
                if is_snapshot && let Some(sender) = self.nodes.get_mut(&from) {
                    sender.report_snapshot(to, delivered);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("cluster did not settle in 10000 rounds");
    }

    /// Advances the clock by one tick on every replica, then processes.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.now_ms += TICK_MS;
        for node in self.nodes.values_mut() {
            node.tick();
        }
        self.process();
    }

    /// Ticks until `done` holds (checked before each tick); false if `max_ticks` ran out.
    pub fn run_until(&mut self, max_ticks: u64, mut done: impl FnMut(&Cluster<S>) -> bool) -> bool {
        self.process();
        for _ in 0..max_ticks {
            if done(self) {
                return true;
            }
            self.tick();
        }
        done(self)
    }

    /// The leaders of the highest term any replica is leader in (normally one).
    pub fn leaders(&self) -> Vec<u64> {
        let top = self
            .nodes
            .values()
            .filter(|n| n.is_leader())
            .map(|n| n.term())
            .max();
        self.nodes
            .values()
            .filter(|n| n.is_leader() && Some(n.term()) == top)
            .map(|n| n.id())
            .collect()
    }

    /// The one leader of the highest term, if there is exactly one.
    pub fn leader(&self) -> Option<u64> {
        match self.leaders().as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Elects a leader (panics after 200 ticks without one).
    pub fn elect(&mut self) -> u64 {
        assert!(
            self.run_until(200, |c| c.leader().is_some()),
            "no leader elected"
        );
        self.leader().expect("leader")
    }

    /// Proposes `command` on replica `id` as the bootstrap admin, stamped with the sim clock.
    pub fn propose(&mut self, id: u64, command: Command) -> Result<()> {
        let entry = Entry {
            actor: Actor::system("bootstrap", Role::Admin),
            now_ms: self.now_ms,
            command,
            write_id: None,
        };
        match self.nodes.get_mut(&id) {
            Some(node) => node.propose(Vec::new(), &entry),
            None => Err(crate::Error::NotLeader { id, leader: 0 }),
        }
    }

    /// Proposes `command` on replica `id` as the bootstrap admin with a context and a write
    /// id, as the coordinator's driver does; returns the log index it was appended at.
    pub fn propose_write(
        &mut self,
        id: u64,
        context: Vec<u8>,
        command: Command,
        write_id: Option<WriteId>,
    ) -> Result<u64> {
        let entry = Entry {
            actor: Actor::system("bootstrap", Role::Admin),
            now_ms: self.now_ms,
            command,
            write_id,
        };
        match self.nodes.get_mut(&id) {
            Some(node) => node.propose(context, &entry).map(|()| node.last_index()),
            None => Err(crate::Error::NotLeader { id, leader: 0 }),
        }
    }

    /// Each replica's state snapshot bytes.
    pub fn snapshots(&self, ids: &BTreeSet<u64>) -> Vec<Vec<u8>> {
        ids.iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|n| n.state().snapshot().expect("snapshot"))
            .collect()
    }

    /// The highest applied index across `ids`, and whether all of them reached it.
    pub fn all_applied(&self, ids: &BTreeSet<u64>) -> bool {
        let applied: BTreeSet<u64> = ids
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|n| n.applied_index())
            .collect();
        applied.len() == 1
    }
}
