//! [`RedbLogStore`]: the durable [`LogStore`], kept in one redb file so that a `kill -9` at any
//! moment loses no acknowledged write.
//!
//! Every mutation commits a redb write transaction with [`Durability::Immediate`] before it
//! returns, so raft's rule "persist before sending the persisted messages" holds. Reads are
//! served from an in-memory [`MemLogStore`] mirror that is updated only after the commit and is
//! rebuilt from the file by [`RedbLogStore::open`]; raft-rs's reads therefore have exactly the
//! in-memory store's semantics.
//!
//! Tables: `entries` (index → protobuf `Entry`), and `hard_state`, `conf_state`, `snapshot`
//! (one protobuf row each, under the key `"current"`; the snapshot row carries the state's bytes).

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry as LogEntry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage as _, StorageError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable as _, TableDefinition};

use super::store::{LogStore, MemLogStore};
use crate::{Error, Result};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const HARD_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("hard_state");
const CONF_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("conf_state");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
/// The key of the single row in the `hard_state`, `conf_state` and `snapshot` tables.
const CURRENT: &str = "current";

/// A Raft log store in a redb file, durable at every call.
pub struct RedbLogStore {
    db: Database,
    path: PathBuf,
    mem: MemLogStore,
    /// Entries below this index may still be on disk although compacted away: they are
    /// deleted a chunk at a time with later writes (deleting 10,000 rows in one transaction
    /// stalled the ready loop for ~200 ms), and `load` never reads below the snapshot.
    disk_compact_to: u64,
    disk_first: u64,
}

fn store_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

/// One redb write: what to change, applied and committed in one transaction.
enum Change<'a> {
    /// Drop entries from this index on, then insert these.
    Append(&'a [LogEntry]),
    HardState(&'a HardState),
    ConfState(&'a ConfState),
    Snapshot(&'a Snapshot),
    /// Drop every entry.
    ClearEntries,
    /// Drop entries in `[from, to)`.
    CompactRange(u64, u64),
}

/// At most this many compacted entries are deleted from disk per write.
const COMPACT_CHUNK: u64 = 512;

impl RedbLogStore {
    /// Opens the store in `path` (a file), creating an empty one if there is none.
    pub fn open(path: impl AsRef<Path>) -> Result<RedbLogStore> {
        let path = path.as_ref().to_path_buf();
        let open_err = |e: &dyn std::fmt::Display| Error::LogStore {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let db = Database::create(&path).map_err(|e| open_err(&e))?;
        let mut store = RedbLogStore {
            db,
            path: path.clone(),
            mem: MemLogStore::new(),
            disk_compact_to: 0,
            disk_first: 0,
        };
        store.create_tables().map_err(|e| open_err(&e))?;
        store.mem = store.load().map_err(|e| open_err(&e))?;
        store.disk_first = store.first_key().map_err(|e| open_err(&e))?;
        store.disk_compact_to = store.mem.snapshot_index();
        Ok(store)
    }

    /// Opens the store in `path` for a replica that bootstraps a cluster with these voters:
    /// a new store records them as the membership, an existing one is reopened as it is.
    pub fn bootstrap(path: impl AsRef<Path>, voters: &[u64]) -> Result<RedbLogStore> {
        let mut store = RedbLogStore::open(path)?;
        let state = store.mem.initial_state().map_err(|e| store.open_err(e))?;
        if !state.initialized() {
            let cs = ConfState::from((voters.to_vec(), vec![]));
            store.set_conf_state(cs).map_err(|e| store.open_err(e))?;
        }
        Ok(store)
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where a snapshot at `index` may be kept outside the redb file (written by
    /// [`write_snapshot_file`], off the Raft thread): beside it, `<file>.snapshot-<index>`.
    pub fn snapshot_file(db: &Path, index: u64) -> PathBuf {
        let mut name = db.as_os_str().to_owned();
        name.push(format!(".snapshot-{index}"));
        PathBuf::from(name)
    }

    /// The index of the stored snapshot (0: none yet).
    pub fn snapshot_index(&self) -> u64 {
        self.mem.snapshot_index()
    }

    fn open_err(&self, e: impl std::fmt::Display) -> Error {
        Error::LogStore {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    fn create_tables(&self) -> std::result::Result<(), redb::Error> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.open_table(ENTRIES)?;
        tx.open_table(HARD_STATE)?;
        tx.open_table(CONF_STATE)?;
        tx.open_table(SNAPSHOT)?;
        tx.commit()?;
        Ok(())
    }

    /// Rebuilds the in-memory mirror from the file.
    fn load(&self) -> raft::Result<MemLogStore> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let read_one = |def: TableDefinition<&str, &[u8]>| -> raft::Result<Option<Vec<u8>>> {
            let table = tx.open_table(def).map_err(store_err)?;
            let row = table.get(CURRENT).map_err(store_err)?;
            Ok(row.map(|v| v.value().to_vec()))
        };
        let mut mem = MemLogStore::new();
        let mut snapshot_index = 0;
        if let Some(bytes) = read_one(SNAPSHOT)? {
            let mut snapshot = Snapshot::parse_from_bytes(&bytes).map_err(store_err)?;
            snapshot_index = snapshot.get_metadata().index;
            // A state never serialises to nothing: empty data means the bytes are in the
            // snapshot's own file.
            if snapshot_index > 0 && snapshot.get_data().is_empty() {
                let file = RedbLogStore::snapshot_file(&self.path, snapshot_index);
                let data = std::fs::read(&file)
                    .map_err(|e| store_err(format!("read {}: {e}", file.display())))?;
                snapshot.set_data(data.into());
            }
            if snapshot_index > 0 {
                mem.apply_snapshot(snapshot)?;
            }
        }
        let table = tx.open_table(ENTRIES).map_err(store_err)?;
        let mut entries = Vec::new();
        for row in table.range(snapshot_index + 1..).map_err(store_err)? {
            let (_, value) = row.map_err(store_err)?;
            entries.push(LogEntry::parse_from_bytes(value.value()).map_err(store_err)?);
        }
        mem.append(&entries)?;
        if let Some(bytes) = read_one(HARD_STATE)? {
            mem.set_hardstate(HardState::parse_from_bytes(&bytes).map_err(store_err)?)?;
        }
        if let Some(bytes) = read_one(CONF_STATE)? {
            mem.set_conf_state(ConfState::parse_from_bytes(&bytes).map_err(store_err)?)?;
        }
        Ok(mem)
    }

    /// The lowest index on disk (0: none).
    fn first_key(&self) -> raft::Result<u64> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(ENTRIES).map_err(store_err)?;
        let first = table.first().map_err(store_err)?;
        Ok(first.map(|(k, _)| k.value()).unwrap_or(0))
    }

    /// Applies `changes` in one write transaction and commits it durably.
    fn write(&self, changes: &[Change<'_>]) -> raft::Result<()> {
        self.write_with(changes, Durability::Immediate)
    }

    /// Applies `changes` in one write transaction, committed with `durability` (a
    /// [`Durability::None`] commit becomes durable with the next immediate one).
    fn write_with(&self, changes: &[Change<'_>], durability: Durability) -> raft::Result<()> {
        let mut tx = self.db.begin_write().map_err(store_err)?;
        tx.set_durability(durability).map_err(store_err)?;
        {
            let mut entries = tx.open_table(ENTRIES).map_err(store_err)?;
            for change in changes {
                match change {
                    Change::Append(new) => {
                        let Some(first) = new.first() else { continue };
                        entries
                            .retain_in(first.index.., |_, _| false)
                            .map_err(store_err)?;
                        for entry in new.iter() {
                            let bytes = entry.write_to_bytes().map_err(store_err)?;
                            entries
                                .insert(entry.index, bytes.as_slice())
                                .map_err(store_err)?;
                        }
                    }
                    Change::ClearEntries => {
                        entries.retain(|_, _| false).map_err(store_err)?;
                    }
                    Change::CompactRange(from, to) => {
                        entries
                            .retain_in(*from..*to, |_, _| false)
                            .map_err(store_err)?;
                    }
                    Change::HardState(hs) => put(&tx, HARD_STATE, *hs)?,
                    Change::ConfState(cs) => put(&tx, CONF_STATE, *cs)?,
                    Change::Snapshot(snapshot) => put(&tx, SNAPSHOT, *snapshot)?,
                }
            }
        }
        tx.commit().map_err(store_err)
    }

    fn hard_state(&self) -> raft::Result<HardState> {
        Ok(self.mem.initial_state()?.hard_state)
    }
}

/// Writes snapshot bytes durably to `path` (temporary file, fsync, rename, directory fsync),
/// from any thread.
pub fn write_snapshot_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn put(
    tx: &redb::WriteTransaction,
    def: TableDefinition<&str, &[u8]>,
    msg: &impl protobuf::Message,
) -> raft::Result<()> {
    let bytes = msg.write_to_bytes().map_err(store_err)?;
    let mut table = tx.open_table(def).map_err(store_err)?;
    table.insert(CURRENT, bytes.as_slice()).map_err(store_err)?;
    Ok(())
}

impl raft::Storage for RedbLogStore {
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

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.mem.snapshot(request_index, to)
    }
}

/// Each call checks what the in-memory store would refuse, commits to redb, then updates the
/// mirror (a `MemLogStore` clone would share its log, so there is no copy to try on).
impl LogStore for RedbLogStore {
    fn append(&mut self, entries: &[LogEntry]) -> raft::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write(&[Change::Append(entries)])?;
        self.mem.append(entries)
    }

    fn persist(&mut self, entries: &[LogEntry], hs: Option<HardState>) -> raft::Result<()> {
        let mut changes = Vec::with_capacity(3);
        // A chunk of the compaction still owed to the disk rides along.
        let chunk_end = self
            .disk_compact_to
            .min(self.disk_first.saturating_add(COMPACT_CHUNK));
        if chunk_end > self.disk_first && !(entries.is_empty() && hs.is_none()) {
            changes.push(Change::CompactRange(self.disk_first, chunk_end));
        }
        if !entries.is_empty() {
            changes.push(Change::Append(entries));
        }
        if let Some(hs) = &hs {
            changes.push(Change::HardState(hs));
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.write(&changes)?;
        if let Some(Change::CompactRange(_, end)) = changes.first() {
            self.disk_first = *end;
        }
        self.mem.append(entries)?;
        if let Some(hs) = hs {
            self.mem.set_hardstate(hs)?;
        }
        Ok(())
    }

    fn set_hardstate(&mut self, hs: HardState) -> raft::Result<()> {
        self.write(&[Change::HardState(&hs)])?;
        self.mem.set_hardstate(hs)
    }

    fn set_commit(&mut self, commit: u64) -> raft::Result<()> {
        let mut hs = self.hard_state()?;
        hs.set_commit(commit);
        self.write_with(&[Change::HardState(&hs)], Durability::None)?;
        self.mem.set_commit(commit)
    }

    fn set_conf_state(&mut self, cs: ConfState) -> raft::Result<()> {
        self.write(&[Change::ConfState(&cs)])?;
        self.mem.set_conf_state(cs)
    }

    fn apply_snapshot(&mut self, snapshot: Snapshot) -> raft::Result<()> {
        let meta = snapshot.get_metadata();
        if self.mem.first_index()? > meta.index {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        // What `MemStorage::apply_snapshot` makes of the hard state and membership.
        let mut hs = self.hard_state()?;
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        self.disk_first = meta.index;
        self.disk_compact_to = meta.index;
        self.write(&[
            Change::ClearEntries,
            Change::Snapshot(&snapshot),
            Change::HardState(&hs),
            Change::ConfState(meta.get_conf_state()),
        ])?;
        self.mem.apply_snapshot(snapshot)
    }

    fn create_snapshot(&mut self, index: u64, cs: ConfState, data: Vec<u8>) -> raft::Result<()> {
        let term = self.mem.term(index)?;
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.clone().into());
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs.clone());
        self.write(&[Change::Snapshot(&snapshot)])?;
        self.mem.create_snapshot(index, cs, data)
    }

    /// Records a snapshot whose bytes [`write_snapshot_file`] already made durable beside the
    /// redb file (only the metadata goes into redb: a multi-megabyte row cost the Raft thread
    /// 40–140 ms); without that file it is stored inline.
    fn create_snapshot_written(
        &mut self,
        index: u64,
        cs: ConfState,
        data: Vec<u8>,
    ) -> raft::Result<()> {
        let file = RedbLogStore::snapshot_file(&self.path, index);
        if !file.is_file() {
            return self.create_snapshot(index, cs, data);
        }
        let term = self.mem.term(index)?;
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs.clone());
        self.write(&[Change::Snapshot(&snapshot)])?;
        self.mem.create_snapshot(index, cs, data)?;
        // Older snapshot files are no longer referenced.
        if let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) {
            let prefix = format!("{}.snapshot-", name.to_string_lossy());
            let keep = format!("{prefix}{index}");
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let n = entry.file_name().to_string_lossy().into_owned();
                if n.starts_with(&prefix) && n != keep {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    fn compact(&mut self, index: u64) -> raft::Result<()> {
        if index > self.mem.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.mem.last_index()? + 1 {
            return Err(store_err(format!(
                "compact index {index} is past the last index"
            )));
        }
        // The disk catches up a chunk per write (see `disk_compact_to`).
        self.disk_compact_to = self.disk_compact_to.max(index);
        self.mem.compact(index)
    }
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::{ConfState, Entry as LogEntry, HardState, Snapshot};
    use raft::{GetEntriesContext, Storage};

    use super::RedbLogStore;
    use crate::raft::store::{LogStore, MemLogStore};

    fn entry(index: u64, term: u64) -> LogEntry {
        let mut e = LogEntry {
            index,
            term,
            ..Default::default()
        };
        e.set_data(format!("entry {index}@{term}").into_bytes().into());
        e
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    fn leader_snapshot(index: u64, term: u64) -> Snapshot {
        let mut s = Snapshot::default();
        s.set_data(b"leader state".to_vec().into());
        let meta = s.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        s
    }

    /// Everything raft-rs can read from a store, rendered for comparison.
    fn observe(s: &impl Storage) -> String {
        let first = s.first_index().unwrap_or(0);
        let last = s.last_index().unwrap_or(0);
        let terms: Vec<String> = (0..=last + 1).map(|i| format!("{:?}", s.term(i))).collect();
        // (`MemStorage::entries` indexes into an empty log, so ask only for a non-empty range.)
        let entries = (last >= first)
            .then(|| s.entries(first, last + 1, None, GetEntriesContext::empty(false)));
        let snapshot = s.snapshot(0, 0);
        format!(
            "first {first} last {last}\nstate {:?}\nterms {terms:?}\nentries {entries:?}\nsnapshot {snapshot:?}",
            s.initial_state()
        )
    }

    enum Op {
        Append(Vec<LogEntry>),
        HardState(HardState),
        Commit(u64),
        Conf(Vec<u64>),
        CreateSnapshot(u64),
        Compact(u64),
        ApplySnapshot(Snapshot),
    }

    fn run(store: &mut impl LogStore, op: &Op) -> String {
        let result = match op {
            Op::Append(entries) => store.append(entries),
            Op::HardState(hs) => store.set_hardstate(hs.clone()),
            Op::Commit(c) => store.set_commit(*c),
            Op::Conf(voters) => store.set_conf_state(ConfState::from((voters.clone(), vec![]))),
            Op::CreateSnapshot(i) => {
                store.create_snapshot(*i, ConfState::from((vec![1, 2, 3], vec![])), vec![7; 8])
            }
            Op::Compact(i) => store.compact(*i),
            Op::ApplySnapshot(s) => store.apply_snapshot(s.clone()),
        };
        format!("{result:?}")
    }

    fn script() -> Vec<Op> {
        vec![
            Op::Conf(vec![1, 2, 3]),
            Op::Append((1..=5).map(|i| entry(i, 1)).collect()),
            Op::HardState(hard_state(1, 1, 2)),
            Op::Append((4..=7).map(|i| entry(i, 2)).collect()),
            Op::Commit(6),
            Op::Compact(3), // refused: no snapshot covers it yet
            Op::CreateSnapshot(4),
            Op::Compact(3),
            Op::Compact(4),
            Op::Append(vec![entry(8, 2)]),
            Op::CreateSnapshot(9), // refused: past the last index
            Op::ApplySnapshot(leader_snapshot(12, 3)),
            Op::Append((13..=15).map(|i| entry(i, 3)).collect()),
            Op::HardState(hard_state(3, 2, 14)),
            Op::ApplySnapshot(leader_snapshot(10, 3)), // refused: out of date
        ]
    }

    #[test]
    fn redb_store_reads_like_the_memory_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut redb = RedbLogStore::open(dir.path().join("log.redb")).expect("open");
        let mut mem = MemLogStore::new();
        assert_eq!(observe(&redb), observe(&mem));
        for (step, op) in script().iter().enumerate() {
            assert_eq!(
                run(&mut redb, op),
                run(&mut mem, op),
                "result of step {step}"
            );
            assert_eq!(observe(&redb), observe(&mem), "reads after step {step}");
        }
    }

    /// What must survive a restart: hard state, membership, snapshot, and the log after it.
    fn durable_view(s: &RedbLogStore) -> String {
        let snapshot_index = s.snapshot_index();
        let last = s.last_index().expect("last index");
        let entries = (last > snapshot_index).then(|| {
            s.entries(
                snapshot_index + 1,
                last + 1,
                None,
                GetEntriesContext::empty(false),
            )
            .expect("entries")
        });
        format!(
            "state {:?}\nlast {last}\nsnapshot term {:?}\nentries {entries:?}\nsnapshot {:?}",
            s.initial_state(),
            s.term(snapshot_index),
            s.snapshot(0, 0)
        )
    }

    #[test]
    fn reopening_returns_what_was_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.redb");
        let script = script();
        for cut in [2, 5, 9, script.len()] {
            std::fs::remove_file(&path).ok();
            let mut store = RedbLogStore::open(&path).expect("open");
            for op in &script[..cut] {
                run(&mut store, op);
            }
            let before = durable_view(&store);
            // Dropped without any shutdown, like a process killed mid-flight.
            drop(store);
            let reopened = RedbLogStore::open(&path).expect("reopen");
            assert_eq!(durable_view(&reopened), before, "after {cut} steps");
        }
    }

    #[test]
    fn bootstrap_records_the_voters_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.redb");
        let mut store = RedbLogStore::bootstrap(&path, &[1, 2, 3]).expect("bootstrap");
        store
            .set_conf_state(ConfState::from((vec![1, 2], vec![])))
            .expect("conf");
        drop(store);
        let store = RedbLogStore::bootstrap(&path, &[1, 2, 3]).expect("reopen");
        let voters = store.initial_state().expect("state").conf_state.voters;
        assert_eq!(voters, vec![1, 2]);
    }
}

#[cfg(test)]
mod snapshot_file_tests {
    use raft::Storage as _;
    use raft::eraftpb::{ConfState, Entry as LogEntry};

    use super::{RedbLogStore, write_snapshot_file};
    use crate::raft::store::LogStore;

    #[test]
    fn a_snapshot_kept_in_its_own_file_survives_a_reopen_and_older_files_go() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.redb");
        let mut store = RedbLogStore::open(&path).expect("open");
        let entries: Vec<LogEntry> = (1..=20)
            .map(|index| LogEntry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect();
        store.append(&entries).expect("append");
        let cs = ConfState::from((vec![1], vec![]));
        for index in [10, 15] {
            let data = format!("state at {index}").into_bytes();
            write_snapshot_file(&RedbLogStore::snapshot_file(&path, index), &data).expect("file");
            store
                .create_snapshot_written(index, cs.clone(), data)
                .expect("record");
            store.compact(index).expect("compact");
        }
        assert!(
            !RedbLogStore::snapshot_file(&path, 10).exists(),
            "the old file is removed"
        );
        drop(store);
        let reopened = RedbLogStore::open(&path).expect("reopen");
        let snapshot = reopened.snapshot(0, 1).expect("snapshot");
        assert_eq!(snapshot.get_metadata().index, 15);
        assert_eq!(snapshot.get_data(), b"state at 15");
        assert_eq!(reopened.first_index().expect("first"), 16);
        assert_eq!(reopened.last_index().expect("last"), 20);
        // A missing file is an error on open, not a silently empty state.
        drop(reopened);
        std::fs::remove_file(RedbLogStore::snapshot_file(&path, 15)).expect("remove");
        assert!(RedbLogStore::open(&path).is_err());
    }
}
