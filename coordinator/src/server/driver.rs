//! The Raft driver: one OS thread that owns the [`ReplicaNode`] and runs its ready loop against
//! the wall clock, the durable [`RedbLogStore`] and the mesh transport.
//!
//! Everything that touches the replica goes through the thread's inbox as an [`Event`]: peer
//! messages, ticks, proposals, reads and membership changes. Before each ready turn the thread
//! drains the inbox, so every proposal that arrived meanwhile rides in one turn and one fsync
//! (proposal batching). Waiters are answered from the applied entries (matched by the context
//! each proposal carries, [`Context`]: this replica, this process's incarnation, a sequence
//! number), from ReadIndex answers, or with a timeout.
//!
//! # Before a leader is known
//! A coordinator that just started knows no leader for a few hundred milliseconds, and raft-rs
//! silently drops a ReadIndex request then (and on a leader that has not committed an entry of
//! its term yet). Linearizable reads therefore wait here, bounded by [`DriverConfig::wait`], and
//! their request is sent once a leader is known, again whenever the leader changes or commits
//! in its term, and every few heartbeats until answered. Proposals that arrive with no leader
//! known wait the same way, then are proposed here or answered "not the leader" (never
//! proposed: the write path forwards them).
//!
//! # What became of a proposal
//! See [`fate`]: applied here (answered with its result), overwritten by another entry at its
//! index (answered "not the leader": it will never commit, the write path may propose it
//! again) or skipped by a snapshot (answered "unavailable: it may have committed", never
//! retried, since the snapshot may hold it).
//!
//! The thread is synchronous on purpose: redb's fsync blocks, and nothing here awaits.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use raft::eraftpb::Message;
use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::transport::MeshMembers;
use crate::raft::RedbLogStore;
use crate::raft::{Context, Fate, ReplicaConfig, ReplicaNode, fate};
use crate::{Entry, Error, Outcome, Result, State};

/// A query run on the driver thread against the applied state.
pub type Query = Box<dyn FnOnce(Result<&State>) + Send>;

/// What the driver thread is asked to do.
pub enum Event {
    /// A message from a peer.
    Message(Box<Message>),
    /// Propose an entry; the answer comes once it is applied here (or fails).
    Propose {
        entry: Box<Entry>,
        reply: oneshot::Sender<Result<Outcome>>,
    },
    /// Run `query` against the state: at once (`linearizable == false`), or once a ReadIndex
    /// round confirmed that this replica has applied everything committed before the call.
    Read { linearizable: bool, query: Query },
    /// Add or remove a voter (leader only).
    ChangeVoter {
        id: u64,
        add: bool,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The transport could not reach a peer.
    Unreachable(u64),
    /// The transport delivered (or failed to deliver) a snapshot.
    SnapshotStatus { to: u64, delivered: bool },
    /// Hand leadership to the most caught-up peer, if leader; answers once it moved or gave up.
    TransferLeadership { reply: oneshot::Sender<bool> },
    /// A snapshot serialised off the thread, ready to store.
    SnapshotTaken {
        index: u64,
        conf_state: raft::eraftpb::ConfState,
        data: Result<Vec<u8>>,
    },
    /// Stop the thread.
    Stop,
}

/// How often the driver ticks and how long waiters wait.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub replica: ReplicaConfig,
    /// One Raft tick.
    pub tick: Duration,
    /// How long a proposal or a linearizable read may wait before it is answered "unavailable".
    pub wait: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            replica: ReplicaConfig {
                snapshot_every: 10_000,
                snapshot_inline: false,
                ..ReplicaConfig::default()
            },
            tick: Duration::from_millis(30),
            wait: Duration::from_secs(5),
        }
    }
}

/// A replica's view of the cluster, refreshed after every ready turn.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RaftStatus {
    pub id: u64,
    pub leader: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub is_leader: bool,
}

/// Outgoing messages, by peer; the transport implements it.
pub trait Outbox: Send + 'static {
    /// Queues `msg` for its `to` peer; never blocks.
    fn send(&self, msg: Message);
    /// The coordinators' mesh addresses changed (from the replicated state).
    fn peers_changed(&self, peers: BTreeMap<u64, String>);
    /// Who the mesh admits changed (Raft configuration, recorded certificates, revocations).
    fn members_changed(&self, _members: MeshMembers) {}
}

/// A handle to the driver thread.
#[derive(Clone)]
pub struct Driver {
    inbox: Sender<Event>,
    status: Arc<RwLock<RaftStatus>>,
    /// Woken whenever entries are applied (the node loop rebuilds the directory at once).
    pub applied: Arc<tokio::sync::Notify>,
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        reason: reason.into(),
    }
}

impl Driver {
    /// Starts the driver thread over `node`; `events` lets the transport feed it.
    /// `incarnation` names this process (drawn at each start): it goes into every context, so
    /// that an entry or a ReadIndex answer meant for a previous process answers no waiter here.
    pub fn start(
        node: ReplicaNode<RedbLogStore>,
        config: DriverConfig,
        outbox: Box<dyn Outbox>,
        metrics: Metrics,
        incarnation: u64,
        (inbox, rx): (Sender<Event>, Receiver<Event>),
    ) -> Result<(Driver, std::thread::JoinHandle<()>)> {
        let mut node = node;
        // The only voter wins its own election: it need not wait out an election timeout
        // (300-600 ms) after every restart, as `sophon dev` and one-coordinator clusters did.
        if node.voters() == [node.id()] {
            node.campaign()?;
        }
        let status = Arc::new(RwLock::new(RaftStatus::default()));
        let applied = Arc::new(tokio::sync::Notify::new());
        let mut thread = DriverThread {
            applied: applied.clone(),
            node,
            config,
            outbox,
            metrics,
            rx,
            status: status.clone(),
            incarnation,
            ticks: 0,
            next_seq: 1,
            proposals: BTreeMap::new(),
            parked: Vec::new(),
            reads: BTreeMap::new(),
            ready_reads: VecDeque::new(),
            transfers: Vec::new(),
            voter_changes: Vec::new(),
            peers: BTreeMap::new(),
            members: None,
            inbox: inbox.clone(),
            snapshotting: false,
        };
        let handle = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || thread.run())
            .map_err(|e| unavailable(format!("cannot start the raft thread: {e}")))?;
        Ok((
            Driver {
                inbox,
                status,
                applied,
            },
            handle,
        ))
    }

    /// Sends an event to the thread (false when the thread has stopped).
    pub fn send(&self, event: Event) -> bool {
        self.inbox.send(event).is_ok()
    }

    /// The replica's latest status.
    pub fn status(&self) -> RaftStatus {
        self.status.read().clone()
    }

    /// Proposes `entry` here (this replica must lead) and waits until it is applied.
    pub async fn propose(&self, entry: Entry) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Event::Propose {
            entry: Box::new(entry),
            reply,
        }) {
            return Err(unavailable("the coordinator is shutting down"));
        }
        rx.await
            .map_err(|_| unavailable("the coordinator is shutting down"))?
    }

    /// Runs `f` against the state, after a ReadIndex round if `linearizable`.
    pub async fn read<T: Send + 'static>(
        &self,
        linearizable: bool,
        f: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let query: Query = Box::new(move |state| {
            let _ = reply.send(state.map(f));
        });
        if !self.send(Event::Read {
            linearizable,
            query,
        }) {
            return Err(unavailable("the coordinator is shutting down"));
        }
        rx.await
            .map_err(|_| unavailable("the coordinator is shutting down"))?
    }

    /// Adds (`add`) or removes a voter; this replica must lead.
    pub async fn change_voter(&self, id: u64, add: bool) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Event::ChangeVoter { id, add, reply }) {
            return Err(unavailable("the coordinator is shutting down"));
        }
        rx.await
            .map_err(|_| unavailable("the coordinator is shutting down"))?
    }

    /// Hands leadership away if this replica leads; true once another replica leads.
    pub async fn transfer_leadership(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        if !self.send(Event::TransferLeadership { reply }) {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Stops the thread (it finishes the turn it is in).
    pub fn stop(&self) {
        let _ = self.inbox.send(Event::Stop);
    }
}

struct PendingProposal {
    /// The log index the entry was appended at here.
    index: u64,
    /// The context it carries.
    ctx: Vec<u8>,
    reply: oneshot::Sender<Result<Outcome>>,
    deadline: Instant,
    started: Instant,
}

/// A proposal that arrived when no leader was known: proposed (or refused) once one is.
struct ParkedProposal {
    entry: Box<Entry>,
    reply: oneshot::Sender<Result<Outcome>>,
    deadline: Instant,
}

struct PendingRead {
    query: Query,
    /// The context its ReadIndex requests carry.
    ctx: Vec<u8>,
    /// When its request was last sent (tick), and to which view of the leadership.
    issued: Option<(ReadView, u64)>,
    deadline: Instant,
}

/// What decides whether a ReadIndex request sent earlier may have been dropped: the leader,
/// the term, and whether this replica leads with an entry of its term committed.
type ReadView = (u64, u64, bool);

struct DriverThread {
    node: ReplicaNode<RedbLogStore>,
    config: DriverConfig,
    outbox: Box<dyn Outbox>,
    metrics: Metrics,
    rx: Receiver<Event>,
    status: Arc<RwLock<RaftStatus>>,
    applied: Arc<tokio::sync::Notify>,
    /// This process's incarnation (in every context).
    incarnation: u64,
    /// Ticks since the thread started.
    ticks: u64,
    next_seq: u64,
    /// Proposals made here, by sequence number (the context's last part).
    proposals: BTreeMap<u64, PendingProposal>,
    /// Proposals waiting for a leader to be known.
    parked: Vec<ParkedProposal>,
    /// Reads waiting for their ReadIndex answer, by sequence number.
    reads: BTreeMap<u64, PendingRead>,
    /// Reads whose ReadIndex is known, waiting for the applied index to reach it.
    ready_reads: VecDeque<(u64, Query)>,
    /// Leadership transfers waiting to finish: (deadline, reply).
    transfers: Vec<(Instant, oneshot::Sender<bool>)>,
    /// Voter changes waiting to be applied: (id, add, deadline, reply).
    voter_changes: Vec<VoterChange>,
    /// The coordinators' mesh addresses as last told to the outbox.
    peers: BTreeMap<u64, String>,
    /// Who the mesh admits, as last told to the outbox.
    members: Option<MeshMembers>,
    /// The thread's own inbox (a snapshot serialised elsewhere comes back through it).
    inbox: Sender<Event>,
    /// A snapshot is being serialised.
    snapshotting: bool,
}

type VoterChange = (u64, bool, Instant, oneshot::Sender<Result<()>>);

/// A channel for the driver's events: make it first, so the transport can hold a sender.
pub fn channel() -> (Sender<Event>, Receiver<Event>) {
    mpsc::channel()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DriverThread {
    fn context(&mut self) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ctx = Context {
            replica: self.node.id(),
            incarnation: self.incarnation,
            seq,
        };
        (seq, ctx.encode())
    }

    /// The sequence number in `ctx` if this replica made it, in this process.
    fn own_seq(&self, ctx: &[u8]) -> Option<u64> {
        Context::seq_if_ours(ctx, self.node.id(), self.incarnation)
    }

    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.config.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Event::Stop) => break,
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Batching: everything that arrived meanwhile joins this turn.
            let mut stop = false;
            while let Ok(event) = self.rx.try_recv() {
                if matches!(event, Event::Stop) {
                    stop = true;
                    break;
                }
                self.handle(event);
            }
            let now = Instant::now();
            if now >= next_tick {
                self.ticks += 1;
                self.node.tick();
                next_tick = now + self.config.tick;
                self.expire(now);
            }
            if let Err(e) = self.ready() {
                // A failing disk: stop rather than diverge from what was promised.
                tracing::error!(error = %e, "the ready loop failed; the coordinator stops");
                break;
            }
            if stop {
                break;
            }
        }
        self.fail_all("the coordinator stopped");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Message(msg) => {
                if let Err(e) = self.node.step(*msg) {
                    tracing::debug!(error = %e, "dropped a raft message");
                }
            }
            Event::Propose { entry, reply } => {
                if self.node.leader_id() == 0 {
                    // Starting up, or between leaders: wait for one (see the module page).
                    self.parked.push(ParkedProposal {
                        entry,
                        reply,
                        deadline: Instant::now() + self.config.wait,
                    });
                } else {
                    self.propose(entry, reply);
                }
            }
            Event::Read {
                linearizable: false,
                query,
            } => query(Ok(self.node.state())),
            Event::Read {
                linearizable: true,
                query,
            } => {
                // Its ReadIndex request goes out at the end of the turn ([`Self::issue_reads`]).
                let (seq, ctx) = self.context();
                self.reads.insert(
                    seq,
                    PendingRead {
                        query,
                        ctx,
                        issued: None,
                        deadline: Instant::now() + self.config.wait,
                    },
                );
            }
            Event::ChangeVoter { id, add, reply } => {
                let result = if add {
                    self.node.propose_add_learner(id)
                } else {
                    self.node.propose_remove_node(id)
                };
                match result {
                    Ok(()) => {
                        self.voter_changes
                            .push((id, add, Instant::now() + self.config.wait, reply))
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Event::Unreachable(id) => self.node.report_unreachable(id),
            Event::SnapshotStatus { to, delivered } => self.node.report_snapshot(to, delivered),
            Event::TransferLeadership { reply } => match self.node.transfer_target() {
                Some(to) => {
                    let _ = self.node.transfer_leader(to);
                    self.transfers
                        .push((Instant::now() + self.config.wait, reply));
                }
                None => {
                    let _ = reply.send(!self.node.is_leader());
                }
            },
            Event::SnapshotTaken {
                index,
                conf_state,
                data,
            } => {
                self.snapshotting = false;
                let stored = data.and_then(|d| self.node.store_snapshot(index, conf_state, d));
                if let Err(e) = stored {
                    tracing::warn!(error = %e, index, "a snapshot could not be stored");
                }
            }
            Event::Stop => {}
        }
    }

    fn propose(&mut self, mut entry: Box<Entry>, reply: oneshot::Sender<Result<Outcome>>) {
        entry.now_ms = now_ms();
        let (seq, ctx) = self.context();
        match self.node.propose(ctx.clone(), &entry) {
            Ok(()) => {
                self.metrics.proposals.inc();
                let now = Instant::now();
                self.proposals.insert(
                    seq,
                    PendingProposal {
                        index: self.node.last_index(),
                        ctx,
                        reply,
                        deadline: now + self.config.wait,
                        started: now,
                    },
                );
            }
            Err(e) => {
                self.metrics.proposals_failed.inc();
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Once a leader is known, proposes the parked proposals here (this replica leads) or
    /// answers them "not the leader" (they were never proposed: the write path forwards them).
    fn unpark(&mut self) {
        if self.parked.is_empty() || self.node.leader_id() == 0 {
            return;
        }
        for parked in std::mem::take(&mut self.parked) {
            if self.node.is_leader() {
                self.propose(parked.entry, parked.reply);
            } else {
                let _ = parked.reply.send(Err(Error::NotLeader {
                    id: self.node.id(),
                    leader: self.node.leader_id(),
                }));
            }
        }
    }

    /// Sends the ReadIndex requests of the reads that wait: once a leader is known, again
    /// when the leadership view changes (raft-rs dropped the request if the leader had not
    /// committed in its term), and every two heartbeats until answered (a lost message).
    /// Sending one twice is harmless: the first answer serves the read, later ones find no
    /// waiter. Returns whether any was sent.
    fn issue_reads(&mut self) -> bool {
        let leader = self.node.leader_id();
        if leader == 0 || self.reads.is_empty() {
            return false;
        }
        let view = (
            leader,
            self.node.term(),
            self.node.is_leader() && self.node.committed_in_term(),
        );
        let retry = 2 * self.config.replica.heartbeat_tick.max(1) as u64;
        let mut sent = false;
        for read in self.reads.values_mut() {
            let due = match read.issued {
                None => true,
                Some((seen, tick)) => seen != view || self.ticks >= tick + retry,
            };
            if due {
                self.node.read_index(read.ctx.clone());
                read.issued = Some((view, self.ticks));
                sent = true;
            }
        }
        sent
    }

    /// Serialises a snapshot on another thread when one is due, so that a large state does
    /// not stall the ready loop (and with it heartbeats and commits).
    fn maybe_snapshot(&mut self) {
        if self.snapshotting || !self.node.snapshot_due() {
            return;
        }
        let (index, conf_state, state) = self.node.snapshot_source();
        let file = RedbLogStore::snapshot_file(self.node.store().path(), index);
        let inbox = self.inbox.clone();
        self.snapshotting = true;
        let spawned = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                // Serialise and write the bytes here; the Raft thread only records them.
                let data = state.snapshot().and_then(|d| {
                    crate::raft::write_snapshot_file(&file, &d)
                        .map(|()| d)
                        .map_err(|e| Error::Io {
                            what: format!("write {}", file.display()),
                            reason: e.to_string(),
                        })
                });
                let _ = inbox.send(Event::SnapshotTaken {
                    index,
                    conf_state,
                    data,
                });
            });
        if spawned.is_err() {
            self.snapshotting = false;
        }
    }

    /// Runs ready turns until there is nothing left to do.
    fn ready(&mut self) -> Result<()> {
        loop {
            let out = self.node.handle_ready()?;
            let idle =
                out.messages.is_empty() && out.applied.is_empty() && out.read_states.is_empty();
            for msg in out.messages {
                self.outbox.send(msg);
            }
            for applied in out.applied {
                self.metrics.applied.inc();
                if let Some(seq) = self.own_seq(&applied.context)
                    && let Some(pending) = self.proposals.remove(&seq)
                {
                    self.metrics
                        .commit_latency
                        .observe(pending.started.elapsed().as_secs_f64());
                    let _ = pending.reply.send(applied.result);
                }
            }
            self.settle_proposals(&out.entries);
            for rs in out.read_states {
                if let Some(seq) = self.own_seq(&rs.request_ctx)
                    && let Some(read) = self.reads.remove(&seq)
                {
                    self.ready_reads.push_back((rs.index, read.query));
                }
            }
            self.serve_reads();
            self.unpark();
            // A read sent now is handled by the next turn.
            if !self.issue_reads() && idle {
                break;
            }
        }
        self.maybe_snapshot();
        self.publish();
        Ok(())
    }

    /// Answers the proposals whose index was applied without them ([`fate`]): overwritten by
    /// another entry (never to commit: "not the leader", the write path proposes it again) or
    /// skipped by a snapshot from the leader (perhaps committed: "unavailable", like a timeout;
    /// proposing it again could apply it twice).
    fn settle_proposals(&mut self, entries: &[(u64, Vec<u8>)]) {
        let applied = self.node.applied_index();
        let decided: Vec<(u64, Fate)> = self
            .proposals
            .iter()
            .map(|(seq, p)| (*seq, fate(p.index, &p.ctx, entries, applied)))
            .filter(|(_, f)| *f != Fate::Pending)
            .collect();
        for (seq, f) in decided {
            let Some(p) = self.proposals.remove(&seq) else {
                continue;
            };
            self.metrics.proposals_failed.inc();
            let error = match f {
                Fate::Lost => Error::NotLeader {
                    id: self.node.id(),
                    leader: self.node.leader_id(),
                },
                // Applied: its result was answered above (its entry carried our context), so
                // this cannot happen; answered as ambiguous all the same.
                Fate::Unknown | Fate::Applied | Fate::Pending => unavailable(format!(
                    "the write may have committed: this coordinator caught up from a snapshot \
                     past its log position {} and cannot tell; read before retrying",
                    p.index
                )),
            };
            let _ = p.reply.send(Err(error));
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.node.applied_index();
        let mut waiting = VecDeque::new();
        while let Some((index, query)) = self.ready_reads.pop_front() {
            if index <= applied {
                query(Ok(self.node.state()));
            } else {
                waiting.push_back((index, query));
            }
        }
        self.ready_reads = waiting;
    }

    /// Refreshes the status, metrics and the transport's address book.
    fn publish(&mut self) {
        // Membership and the address book change only when entries are applied.
        let applied = self.node.applied_index() != self.status.read().applied_index;
        // A new member can only install a snapshot whose membership names it: take one as
        // soon as the voters change, so that the leader sends that one.
        let changed = applied && {
            let old = self.status.read();
            self.node.voters() != old.voters || self.node.learners() != old.learners
        };
        if changed && let Err(e) = self.node.snapshot_now() {
            tracing::warn!(error = %e, "could not snapshot after a membership change");
        }
        // A learner that caught up becomes a voter.
        for learner in self.node.learners() {
            if self.node.learner_caught_up(learner) {
                match self.node.propose_add_node(learner) {
                    Ok(()) => tracing::info!(learner, "promoting a caught-up learner to voter"),
                    Err(e) => tracing::debug!(learner, error = %e, "cannot promote yet"),
                }
                break;
            }
        }
        let status = RaftStatus {
            id: self.node.id(),
            leader: self.node.leader_id(),
            term: self.node.term(),
            commit_index: self.node.commit_index(),
            applied_index: self.node.applied_index(),
            voters: self.node.voters(),
            learners: self.node.learners(),
            is_leader: self.node.is_leader(),
        };
        self.metrics.observe(&status);
        if self.transfers.iter().any(|_| !status.is_leader) {
            for (_, reply) in self.transfers.drain(..) {
                let _ = reply.send(true);
            }
        }
        let (done, waiting): (Vec<VoterChange>, Vec<VoterChange>) =
            self.voter_changes.drain(..).partition(|(id, add, _, _)| {
                (status.voters.contains(id) || status.learners.contains(id)) == *add
            });
        self.voter_changes = waiting;
        for (_, _, _, reply) in done {
            let _ = reply.send(Ok(()));
        }
        *self.status.write() = status;
        if applied {
            self.applied.notify_one();
        }
        if !applied {
            return;
        }
        let peers: BTreeMap<u64, String> = self
            .node
            .state()
            .coordinators()
            .values()
            .map(|c| (c.id, c.address.clone()))
            .collect();
        if peers != self.peers {
            self.peers = peers.clone();
            self.outbox.peers_changed(peers);
        }
        let members = MeshMembers::new(
            self.node.state(),
            &self.node.voters(),
            &self.node.learners(),
        );
        if self.members.as_ref() != Some(&members) {
            self.members = Some(members.clone());
            self.outbox.members_changed(members);
        }
    }

    /// Answers the waiters whose time is up.
    fn expire(&mut self, now: Instant) {
        let (late, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.parked = waiting;
        for p in late {
            // Never proposed: safe to retry.
            self.metrics.proposals_failed.inc();
            let _ = p.reply.send(Err(unavailable(
                "no leader was elected in time (the write was not proposed): retry",
            )));
        }
        let late: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in late {
            if let Some(p) = self.proposals.remove(&seq) {
                self.metrics.proposals_failed.inc();
                let _ = p.reply.send(Err(unavailable(
                    "the write was not confirmed in time (no quorum or a leader change); it may \
                     still be committed: read before retrying",
                )));
            }
        }
        let late: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in late {
            if let Some(r) = self.reads.remove(&seq) {
                (r.query)(Err(unavailable(
                    "no leader confirmed the read in time: retry",
                )));
            }
        }
        let (late, waiting): (Vec<VoterChange>, Vec<VoterChange>) = self
            .voter_changes
            .drain(..)
            .partition(|(_, _, deadline, _)| *deadline <= now);
        self.voter_changes = waiting;
        for (id, _, _, reply) in late {
            let _ = reply.send(Err(unavailable(format!(
                "the membership change for coordinator {id} was not applied in time"
            ))));
        }
        let (done, waiting): (Vec<_>, Vec<_>) = self
            .transfers
            .drain(..)
            .partition(|(deadline, _)| *deadline <= now);
        self.transfers = waiting;
        for (_, reply) in done {
            let _ = reply.send(!self.node.is_leader());
        }
    }

    fn fail_all(&mut self, why: &str) {
        for (_, p) in std::mem::take(&mut self.proposals) {
            let _ = p.reply.send(Err(unavailable(why)));
        }
        for p in std::mem::take(&mut self.parked) {
            let _ = p.reply.send(Err(unavailable(why)));
        }
        for (_, r) in std::mem::take(&mut self.reads) {
            (r.query)(Err(unavailable(why)));
        }
        for (_, query) in std::mem::take(&mut self.ready_reads) {
            query(Err(unavailable(why)));
        }
    }
}
