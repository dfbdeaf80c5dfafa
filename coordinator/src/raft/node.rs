//! [`ReplicaNode`]: one coordinator's Raft replica, sans IO. It owns raft-rs's `RawNode`, the
//! replicated [`State`] and the ready loop ([`ReplicaNode::handle_ready`]), which follows the
//! order raft-rs's `five_mem_node` example documents.

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry as LogEntry, EntryType, Message,
};
use raft::{RawNode, ReadState, SnapshotStatus, StateRole};

use super::store::LogStore;
use crate::{Entry, Error, Outcome, Result, State};

/// How a replica runs.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's Raft id (non-zero).
    pub id: u64,
    /// Ticks without a heartbeat before a follower campaigns.
    pub election_tick: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_tick: usize,
    /// Applied entries between two snapshots (the log is compacted at each snapshot).
    pub snapshot_every: u64,
    /// Whether the ready loop takes those snapshots itself. A driver that serialises the
    /// state on another thread turns this off and uses [`ReplicaNode::snapshot_due`] and
    /// [`ReplicaNode::store_snapshot`].
    pub snapshot_inline: bool,
}

impl Default for ReplicaConfig {
    fn default() -> ReplicaConfig {
        ReplicaConfig {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 3,
            snapshot_every: 1000,
            snapshot_inline: true,
        }
    }
}

/// What one turn of the ready loop produced.
#[derive(Debug, Default)]
pub struct ReadyOutput {
    /// Messages to deliver to peers, in order.
    pub messages: Vec<Message>,
    /// Normal entries applied this turn, in log order.
    pub applied: Vec<Applied>,
    /// ReadIndex requests that are now safe to serve once `index` is applied.
    pub read_states: Vec<ReadState>,
    /// Every entry applied this turn, normal, empty (a new leader's) or membership change, as
    /// (index, context), in log order: what a proposer needs to tell which of its proposals
    /// lost their index ([`fate`](super::proposals::fate)). Indexes a snapshot skipped are not
    /// here.
    pub entries: Vec<(u64, Vec<u8>)>,
}

/// One applied normal entry.
#[derive(Debug)]
pub struct Applied {
    /// Its log index.
    pub index: u64,
    /// The context its proposer attached ([`ReplicaNode::propose`]), so that the replica that
    /// proposed it can answer the waiting client, whoever was leader when it committed.
    pub context: Vec<u8>,
    /// What [`State::apply`] returned.
    pub result: Result<Outcome>,
}

/// One Raft replica of the coordinator state.
pub struct ReplicaNode<S: LogStore> {
    raw: RawNode<S>,
    state: State,
    conf_state: ConfState,
    snapshot_every: u64,
    snapshot_inline: bool,
    applied_index: u64,
    last_snapshot_index: u64,
}

fn raft_err(id: u64, e: impl std::fmt::Display) -> Error {
    Error::Raft {
        id,
        reason: e.to_string(),
    }
}

impl<S: LogStore> ReplicaNode<S> {
    /// Starts a replica on `store`, logging through `logger`
    /// ([`tracing_logger`](super::tracing_logger) in production).
    pub fn new(config: &ReplicaConfig, store: S, logger: &slog::Logger) -> Result<ReplicaNode<S>> {
        ReplicaNode::start(config, store, State::new(), 0, logger)
    }

    /// Restarts a replica from a store that outlived it (a durable one reopened after a crash):
    /// the state is restored from the stored snapshot, and raft hands the committed entries
    /// after the snapshot to the ready loop again, which re-applies them.
    pub fn restart(
        config: &ReplicaConfig,
        store: S,
        logger: &slog::Logger,
    ) -> Result<ReplicaNode<S>> {
        let id = config.id;
        match store.snapshot(0, id) {
            Ok(snapshot) => {
                let state = State::restore(snapshot.get_data())?;
                let index = snapshot.get_metadata().index;
                ReplicaNode::start(config, store, state, index, logger)
            }
            // No snapshot yet: the log is complete, and everything committed is applied anew.
            Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable)) => {
                ReplicaNode::start(config, store, State::new(), 0, logger)
            }
            Err(e) => Err(raft_err(id, e)),
        }
    }

    fn start(
        config: &ReplicaConfig,
        store: S,
        state: State,
        applied: u64,
        logger: &slog::Logger,
    ) -> Result<ReplicaNode<S>> {
        let id = config.id;
        let raft_config = raft::Config {
            id,
            election_tick: config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            check_quorum: true,
            pre_vote: true,
            applied,
            // raft-rs's default (0) sends one entry per append message; a batch of proposals
            // should travel together.
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            batch_append: true,
            ..Default::default()
        };
        raft_config.validate().map_err(|e| raft_err(id, e))?;
        let initial = store.initial_state().map_err(|e| raft_err(id, e))?;
        let raw = RawNode::new(&raft_config, store, logger).map_err(|e| raft_err(id, e))?;
        Ok(ReplicaNode {
            raw,
            state,
            conf_state: initial.conf_state,
            snapshot_every: config.snapshot_every.max(1),
            snapshot_inline: config.snapshot_inline,
            applied_index: applied,
            last_snapshot_index: applied,
        })
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    /// The replicated state as of the last applied entry.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this replica knows of (0: none).
    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The voters as of the last applied conf change.
    pub fn voters(&self) -> Vec<u64> {
        self.conf_state.voters.clone()
    }

    /// The log store (to inspect in tests, or to flush in a driver).
    pub fn store(&self) -> &S {
        self.raw.store()
    }

    fn ensure_leader(&self) -> Result<()> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(Error::NotLeader {
                id: self.id(),
                leader: self.leader_id(),
            })
        }
    }

    /// Proposes an entry; it is applied once committed (see [`ReadyOutput::applied`]), where it
    /// comes back with `context`.
    pub fn propose(&mut self, context: Vec<u8>, entry: &Entry) -> Result<()> {
        self.ensure_leader()?;
        let data = serde_json::to_vec(entry).map_err(|e| raft_err(self.id(), e))?;
        let id = self.id();
        self.raw.propose(context, data).map_err(|e| raft_err(id, e))
    }

    /// The index of the last entry in this replica's log (a proposal just accepted sits there).
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Whether the commit index is at an entry of the current term: until then, a leader drops
    /// ReadIndex requests (raft-rs answers none until it committed in its term).
    pub fn committed_in_term(&self) -> bool {
        self.raw.raft.commit_to_current_term()
    }

    /// The commit index this replica knows of.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// The voter (other than this leader) whose log matches the leader's furthest, to hand
    /// leadership to on a graceful shutdown (`None` on a follower or a single-member cluster).
    pub fn transfer_target(&self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let me = self.id();
        self.raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != me && self.conf_state.voters.contains(id))
            .max_by_key(|(id, pr)| (pr.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    fn propose_change(&mut self, node: u64, change_type: ConfChangeType) -> Result<()> {
        self.ensure_leader()?;
        let mut cc = ConfChange {
            node_id: node,
            ..Default::default()
        };
        cc.set_change_type(change_type);
        let id = self.id();
        self.raw
            .propose_conf_change(vec![], cc)
            .map_err(|e| raft_err(id, e))
    }

    /// The learners (non-voting members catching up) as of the last applied conf change.
    pub fn learners(&self) -> Vec<u64> {
        self.conf_state.learners.clone()
    }

    /// Proposes adding `node` as a learner: it receives the log but does not vote, so a new
    /// member that is still starting or catching up costs the cluster no quorum.
    pub fn propose_add_learner(&mut self, node: u64) -> Result<()> {
        self.propose_change(node, ConfChangeType::AddLearnerNode)
    }

    /// On the leader: whether learner `node` has everything committed (time to promote it).
    pub fn learner_caught_up(&self, node: u64) -> bool {
        self.is_leader()
            && !self.raw.raft.has_pending_conf()
            && self
                .raw
                .raft
                .prs()
                .get(node)
                .is_some_and(|pr| pr.matched >= self.raw.raft.raft_log.committed)
    }

    /// Proposes adding `node` as a voter.
    pub fn propose_add_node(&mut self, node: u64) -> Result<()> {
        self.propose_change(node, ConfChangeType::AddNode)
    }

    /// Proposes removing `node`.
    pub fn propose_remove_node(&mut self, node: u64) -> Result<()> {
        self.propose_change(node, ConfChangeType::RemoveNode)
    }

    /// Asks the leader to hand leadership to `to` (ignored on a follower).
    pub fn transfer_leader(&mut self, to: u64) -> Result<()> {
        self.ensure_leader()?;
        self.raw.transfer_leader(to);
        Ok(())
    }

    /// Starts a linearizable read; it is safe once a [`ReadState`] with the same `ctx` comes
    /// back in [`ReadyOutput::read_states`] and its index is applied.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    /// Tells raft whether a snapshot sent to `to` arrived; until a lost snapshot is reported,
    /// the leader sends that peer nothing else.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    /// Tells raft that a message to `to` could not be sent (the leader then probes it again).
    pub fn report_unreachable(&mut self, to: u64) {
        self.raw.report_unreachable(to);
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Feeds a message from a peer.
    pub fn step(&mut self, msg: Message) -> Result<()> {
        let id = self.id();
        self.raw.step(msg).map_err(|e| raft_err(id, e))
    }

    /// Whether a ready turn has work to do.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Runs one turn of the ready loop: the only place that persists, applies and emits.
    pub fn handle_ready(&mut self) -> Result<ReadyOutput> {
        let mut out = ReadyOutput::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let id = self.id();
        let mut ready = self.raw.ready();

        // 1. Send messages: a leader may send before it persists (the followers persist too).
        out.messages.extend(ready.take_messages());

        // 2. Apply the snapshot the leader sent, to the store and to the state.
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.state = State::restore(snapshot.get_data())?;
            let meta = snapshot.get_metadata();
            self.conf_state = meta.get_conf_state().clone();
            self.applied_index = meta.index;
            self.last_snapshot_index = meta.index;
            self.raw
                .mut_store()
                .apply_snapshot(snapshot)
                .map_err(|e| raft_err(id, e))?;
        }

        // ReadIndex answers ride on the full ready only.
        out.read_states.extend(ready.take_read_states());

        // 3. Apply committed entries.
        let committed = ready.take_committed_entries();
        self.apply_entries(committed, &mut out)?;

        // 4. Persist new log entries and the hard state, durably, in one write.
        self.raw
            .mut_store()
            .persist(ready.entries(), ready.hs().cloned())
            .map_err(|e| raft_err(id, e))?;

        // 5. Send the messages that had to wait until the entries were persisted.
        out.messages.extend(ready.take_persisted_messages());

        // 6. Advance: tell raft this ready was handled, and handle the light ready it returns
        //    (a new commit index, more messages, more committed entries).
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw
                .mut_store()
                .set_commit(commit)
                .map_err(|e| raft_err(id, e))?;
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed, &mut out)?;
        self.raw.advance_apply();

        // 7. Snapshot and compact once enough entries were applied since the last snapshot.
        self.maybe_snapshot()?;
        Ok(out)
    }

    fn apply_entries(&mut self, entries: Vec<LogEntry>, out: &mut ReadyOutput) -> Result<()> {
        let id = self.id();
        for log_entry in entries {
            let index = log_entry.index;
            self.applied_index = index;
            out.entries.push((index, log_entry.context.to_vec()));
            if log_entry.data.is_empty() {
                // The empty entry a new leader appends (or an empty conf change): nothing to do.
                continue;
            }
            match log_entry.get_entry_type() {
                EntryType::EntryNormal => {
                    let result = serde_json::from_slice::<Entry>(&log_entry.data)
                        .map_err(|e| Error::LogEntry {
                            index,
                            reason: e.to_string(),
                        })
                        .and_then(|entry| self.state.apply(&entry));
                    out.applied.push(Applied {
                        index,
                        context: log_entry.context.to_vec(),
                        result,
                    });
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&log_entry.data).map_err(|e| {
                        Error::LogEntry {
                            index,
                            reason: e.to_string(),
                        }
                    })?;
                    let cs = self
                        .raw
                        .apply_conf_change(&cc)
                        .map_err(|e| raft_err(id, e))?;
                    self.store_conf_state(cs)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&log_entry.data).map_err(|e| {
                        Error::LogEntry {
                            index,
                            reason: e.to_string(),
                        }
                    })?;
                    let cs = self
                        .raw
                        .apply_conf_change(&cc)
                        .map_err(|e| raft_err(id, e))?;
                    self.store_conf_state(cs)?;
                }
            }
        }
        Ok(())
    }

    /// Persists and remembers the membership a conf change produced.
    fn store_conf_state(&mut self, cs: ConfState) -> Result<()> {
        let id = self.id();
        self.raw
            .mut_store()
            .set_conf_state(cs.clone())
            .map_err(|e| raft_err(id, e))?;
        self.conf_state = cs;
        Ok(())
    }

    /// Takes a snapshot of the applied state now and compacts the log up to it (a new cluster
    /// does this once after its bootstrap, so that joining members start from a snapshot that
    /// carries the membership).
    pub fn snapshot_now(&mut self) -> Result<()> {
        if self.applied_index == self.last_snapshot_index {
            return Ok(());
        }
        self.take_snapshot()
    }

    /// Campaigns to become leader at once (a single-member cluster at bootstrap).
    pub fn campaign(&mut self) -> Result<()> {
        let id = self.id();
        self.raw.campaign().map_err(|e| raft_err(id, e))
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        if !self.snapshot_inline || !self.snapshot_due() {
            return Ok(());
        }
        self.take_snapshot()
    }

    /// Whether enough entries were applied since the last snapshot to take another.
    pub fn snapshot_due(&self) -> bool {
        self.applied_index >= self.last_snapshot_index + self.snapshot_every
    }

    /// What a snapshot taken now needs: (applied index, membership, a copy of the state) —
    /// serialise the copy anywhere, then hand the bytes to [`ReplicaNode::store_snapshot`].
    pub fn snapshot_source(&self) -> (u64, ConfState, State) {
        (
            self.applied_index,
            self.conf_state.clone(),
            self.state.clone(),
        )
    }

    /// Stores a snapshot of the state as of `index` (serialised elsewhere) and compacts the
    /// log up to it. Ignored if a newer snapshot is already stored (one arrived from the
    /// leader meanwhile).
    pub fn store_snapshot(&mut self, index: u64, cs: ConfState, data: Vec<u8>) -> Result<()> {
        if index <= self.last_snapshot_index {
            return Ok(());
        }
        let id = self.id();
        let store = self.raw.mut_store();
        store
            .create_snapshot_written(index, cs, data)
            .map_err(|e| raft_err(id, e))?;
        store.compact(index).map_err(|e| raft_err(id, e))?;
        self.last_snapshot_index = index;
        tracing::debug!(replica = id, index, "snapshot stored and log compacted");
        Ok(())
    }

    fn take_snapshot(&mut self) -> Result<()> {
        let data = self.state.snapshot()?;
        self.store_snapshot(self.applied_index, self.conf_state.clone(), data)
    }
}
