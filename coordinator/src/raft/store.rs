//! Where the Raft log, hard state and snapshots are kept: the ready loop talks to the small
//! [`LogStore`] trait, so the in-memory [`MemLogStore`] used now can be replaced by a durable
//! store (redb, raft-engine) without touching [`ReplicaNode`](super::ReplicaNode).

use raft::eraftpb::{ConfState, Entry as LogEntry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage as _, StorageError};

/// What the ready loop needs from storage, on top of what raft-rs reads through
/// [`raft::Storage`].
pub trait LogStore: raft::Storage {
    /// Appends (or overwrites from their first index) unstable entries.
    fn append(&mut self, entries: &[LogEntry]) -> raft::Result<()>;
    /// Persists the hard state (term, vote, commit).
    fn set_hardstate(&mut self, hs: HardState) -> raft::Result<()>;
    /// Persists new entries and, if given, the hard state as one durable write (the ready loop's
    /// step 4: one fsync per turn however many proposals it carries).
    fn persist(&mut self, entries: &[LogEntry], hs: Option<HardState>) -> raft::Result<()> {
        self.append(entries)?;
        if let Some(hs) = hs {
            self.set_hardstate(hs)?;
        }
        Ok(())
    }
    /// Persists a new commit index only. It need not be durable at once: after a crash raft
    /// learns the commit index again from the leader (or, alone, by committing its log anew).
    fn set_commit(&mut self, commit: u64) -> raft::Result<()>;
    /// Persists the membership after a conf change was applied.
    fn set_conf_state(&mut self, cs: ConfState) -> raft::Result<()>;
    /// Replaces the log with a snapshot received from the leader.
    fn apply_snapshot(&mut self, snapshot: Snapshot) -> raft::Result<()>;
    /// Stores a snapshot of the applied state at `index` (the state machine's bytes in `data`).
    fn create_snapshot(&mut self, index: u64, cs: ConfState, data: Vec<u8>) -> raft::Result<()>;
    /// Like [`LogStore::create_snapshot`], for a snapshot whose bytes the caller may already
    /// have written durably elsewhere (see [`RedbLogStore`](super::RedbLogStore)), so that the
    /// store only records where they are.
    fn create_snapshot_written(
        &mut self,
        index: u64,
        cs: ConfState,
        data: Vec<u8>,
    ) -> raft::Result<()> {
        self.create_snapshot(index, cs, data)
    }
    /// Discards entries before `index` (which must be covered by a stored snapshot).
    fn compact(&mut self, index: u64) -> raft::Result<()>;
}

/// raft-rs's [`MemStorage`] plus the last snapshot with its data (`MemStorage` keeps only the
/// snapshot's metadata).
#[derive(Clone, Default)]
pub struct MemLogStore {
    mem: MemStorage,
    snapshot: Snapshot,
}

impl MemLogStore {
    /// An empty store for a replica that joins an existing cluster.
    pub fn new() -> MemLogStore {
        MemLogStore::default()
    }

    /// A store for one of the replicas that bootstrap a cluster with these voters.
    pub fn with_voters(voters: &[u64]) -> MemLogStore {
        MemLogStore {
            mem: MemStorage::new_with_conf_state((voters.to_vec(), vec![])),
            snapshot: Snapshot::default(),
        }
    }

    /// The index of the stored snapshot (0: none yet).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The last stored snapshot, with its data (empty metadata: none yet).
    pub fn last_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl raft::Storage for MemLogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<LogEntry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Only snapshots that carry the state's bytes are ever handed out; before the first
        // compaction the log is complete, so none is needed.
        if self.snapshot.get_metadata().index == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

impl LogStore for MemLogStore {
    fn append(&mut self, entries: &[LogEntry]) -> raft::Result<()> {
        self.mem.wl().append(entries)
    }

    fn set_hardstate(&mut self, hs: HardState) -> raft::Result<()> {
        self.mem.wl().set_hardstate(hs);
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> raft::Result<()> {
        self.mem.wl().mut_hard_state().set_commit(commit);
        Ok(())
    }

    fn set_conf_state(&mut self, cs: ConfState) -> raft::Result<()> {
        self.mem.wl().set_conf_state(cs);
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: Snapshot) -> raft::Result<()> {
        self.mem.wl().apply_snapshot(snapshot.clone())?;
        self.snapshot = snapshot;
        Ok(())
    }

    fn create_snapshot(&mut self, index: u64, cs: ConfState, data: Vec<u8>) -> raft::Result<()> {
        let term = self.mem.term(index)?;
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.into());
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs);
        self.snapshot = snapshot;
        Ok(())
    }

    fn compact(&mut self, index: u64) -> raft::Result<()> {
        if index > self.snapshot.get_metadata().index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.mem.wl().compact(index)
    }
}
