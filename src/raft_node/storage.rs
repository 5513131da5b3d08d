//! `RaftStorage`: raft-rs's `MemStorage` plus the application's latest snapshot.
//!
//! etcd's `MemoryStorage` keeps the snapshot the application created (`CreateSnapshot`) or
//! received (`ApplySnapshot`) *with its data*, and hands it to raft when a follower is so far
//! behind that the leader must send a `MsgSnapshot`. raft-rs's `MemStorage::snapshot()` instead
//! fabricates a metadata-only snapshot at the commit index, with empty data: a follower that
//! installed it would lose every key. So this wrapper keeps the real snapshot beside the log and
//! answers `Storage::snapshot` with it. Every other method is `MemStorage`'s.

use std::sync::{Arc, RwLock};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// The raft log in memory (entries since the last compaction, hard state, conf state) and the
/// newest snapshot with data. Cheap to clone: both halves are shared.
#[derive(Clone, Default)]
pub struct RaftStorage {
    mem: MemStorage,
    snapshot: Arc<RwLock<Snapshot>>,
}

impl RaftStorage {
    /// An empty log (first index 1), no snapshot.
    pub fn new() -> RaftStorage {
        RaftStorage::default()
    }

    /// The in-memory log, for appends, hard state and conf state updates, compaction.
    pub fn mem(&self) -> &MemStorage {
        &self.mem
    }

    /// The newest snapshot this node created or installed (index 0 if none).
    pub fn latest_snapshot(&self) -> Snapshot {
        self.snapshot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Installs a snapshot received from the leader or loaded at start: the log restarts after
    /// it, and raft will serve it to peers that fall behind.
    pub fn apply_snapshot(&self, snap: Snapshot) -> raft::Result<()> {
        self.mem.wl().apply_snapshot(snap.clone())?;
        self.set_latest_snapshot(snap);
        Ok(())
    }

    /// Records a snapshot this node created from its own state (the log is compacted
    /// separately, so that slow followers can still catch up from entries).
    pub fn set_latest_snapshot(&self, snap: Snapshot) {
        *self
            .snapshot
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = snap;
    }

    /// Appends entries (truncating any conflicting suffix) and records the hard state.
    pub fn append(&self, ents: &[Entry], hs: Option<&HardState>) -> raft::Result<()> {
        let mut core = self.mem.wl();
        core.append(ents)?;
        if let Some(hs) = hs {
            core.set_hardstate(hs.clone());
        }
        Ok(())
    }

    /// Records a commit index learnt after the Ready was handled (`LightReady::commit_index`).
    pub fn set_commit(&self, commit: u64) {
        self.mem.wl().mut_hard_state().commit = commit;
    }

    /// Records the membership after a conf change was applied.
    pub fn set_conf_state(&self, cs: ConfState) {
        self.mem.wl().set_conf_state(cs);
    }
}

impl Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
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

    /// The latest real snapshot. raft-rs treats an index-0 snapshot as fatal, so when none
    /// exists yet (or it is older than raft asked for) we say "try later" instead.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snap = self.latest_snapshot();
        let index = snap.get_metadata().index;
        if index == 0 || index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(index: u64, term: u64, data: &[u8]) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        s.data = data.to_vec().into();
        s
    }

    #[test]
    fn snapshot_is_unavailable_until_one_exists() {
        let st = RaftStorage::new();
        assert!(matches!(
            st.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
    }

    #[test]
    fn snapshot_carries_the_application_data() {
        let st = RaftStorage::new();
        st.apply_snapshot(snap(10, 2, b"state")).expect("apply");
        let got = st.snapshot(0, 2).expect("snapshot");
        assert_eq!(got.get_metadata().index, 10);
        assert_eq!(&got.data[..], b"state");
        assert_eq!(st.first_index().expect("first"), 11);
        // Older than requested: raft must wait for a newer one.
        assert!(st.snapshot(11, 2).is_err());
    }
}
