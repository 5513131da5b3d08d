//! Start-up: rebuild the raft log from the newest snapshot and the WAL, or write a new
//! cluster's first entries (Go: `loadSnapshot`, `openWAL`, `replayWAL`, and what etcd's
//! `StartNode` does for a new cluster).

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Snapshot};

use super::storage::RaftStorage;
use super::{Config, NodeError};
use crate::snap::{SnapError, Snapshotter};
use crate::wal::{Wal, WalSnapshot};

/// What start-up recovered.
pub(super) struct Replayed {
    /// The log, hard state and conf state raft starts from.
    pub storage: RaftStorage,
    /// The WAL, open for appending after its last record.
    pub wal: Wal,
    /// The snapshot the log starts after, to hand to the key-value store.
    pub snapshot: Option<Snapshot>,
}

/// Opens the node's stored state, or bootstraps a new one.
///
/// - WAL present: load the newest snapshot that the WAL also records (a snapshot file without
///   its WAL record may be from a crash mid-save), open the WAL at that snapshot, and replay
///   the hard state and entries after it.
/// - No WAL, `--join`: an empty log. The node waits for the leader to send it the log (or a
///   snapshot), which carries the membership.
/// - No WAL, new cluster: as etcd's `StartNode`, the initial members become `ConfChange`
///   entries 1..n (term 1, committed) in the WAL and the log. raft-rs has no such bootstrap
///   (it would keep the voters only in memory), and without it a restarted node would not know
///   its peers and a joining node replaying the log from index 1 would never learn them. Each
///   entry carries the member's URL as context, as etcd does, so the log itself says where
///   every member listens.
pub(super) fn open_or_bootstrap(
    cfg: &Config,
    snapshotter: &Snapshotter,
) -> Result<Replayed, NodeError> {
    create_private_dir(&cfg.snap_dir())?;
    let wal_dir = cfg.wal_dir();
    if !Wal::exist(&wal_dir)? {
        let mut wal = Wal::create(&wal_dir, &[])?;
        let storage = RaftStorage::new();
        if !cfg.join {
            let (hs, ents, cs) = bootstrap_entries(&cfg.peers);
            wal.save(&hs, &ents)?;
            storage.append(&ents, Some(&hs))?;
            storage.set_conf_state(cs);
        }
        tracing::info!(dir = %wal_dir.display(), join = cfg.join, "created a new WAL");
        return Ok(Replayed {
            storage,
            wal,
            snapshot: None,
        });
    }

    let wal_snaps = crate::wal::valid_snapshot_entries(&wal_dir)?;
    let snapshot = match snapshotter.load_newest_available(&wal_snaps) {
        Ok(s) => Some(s),
        Err(SnapError::NoSnapshot { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let walsnap = snapshot
        .as_ref()
        .map(|s| WalSnapshot {
            index: s.get_metadata().index,
            term: s.get_metadata().term,
            conf_state: None,
        })
        .unwrap_or_default();
    tracing::info!(
        dir = %wal_dir.display(),
        term = walsnap.term,
        index = walsnap.index,
        "replaying WAL"
    );
    let mut wal = Wal::open(&wal_dir, &walsnap)?;
    let (_metadata, hs, ents) = wal.read_all()?;

    let last_index = ents.last().map_or(walsnap.index, |e| e.index);
    if hs.commit > last_index {
        // raft-rs would panic on it; say what is wrong instead.
        return Err(crate::wal::WalError::CommitBeyondEntries {
            dir: wal_dir,
            commit: hs.commit,
            last_index,
            snap_index: walsnap.index,
        }
        .into());
    }
    let storage = RaftStorage::new();
    if let Some(snap) = &snapshot {
        storage.apply_snapshot(snap.clone())?;
    }
    let hs = (hs != HardState::default()).then_some(hs);
    storage.append(&ents, hs.as_ref())?;
    tracing::info!(entries = ents.len(), last_index, "replayed WAL");
    Ok(Replayed {
        storage,
        wal,
        snapshot,
    })
}

/// The first entries of a new cluster: `AddNode(i)` at index i, term 1, for every member, all
/// committed.
fn bootstrap_entries(peers: &[String]) -> (HardState, Vec<Entry>, ConfState) {
    let n = peers.len() as u64;
    let ents = peers
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let id = i as u64 + 1;
            let mut cc = ConfChange::default();
            cc.set_change_type(ConfChangeType::AddNode);
            cc.node_id = id;
            cc.context = url.clone().into_bytes().into();
            let mut e = Entry::default();
            e.set_entry_type(EntryType::EntryConfChange);
            e.term = 1;
            e.index = id;
            e.data = cc
                .write_to_bytes()
                .expect("invariant: encoding a ConfChange into memory cannot fail")
                .into();
            e
        })
        .collect();
    let hs = HardState {
        term: 1,
        vote: 0,
        commit: n,
        ..Default::default()
    };
    let cs = ConfState {
        voters: (1..=n).collect(),
        ..Default::default()
    };
    (hs, ents, cs)
}

/// Creates a data directory readable only by its owner and group (Go: `os.Mkdir(dir, 0750)`),
/// and makes its entry durable: a power cut must not lose a directory that WAL records will
/// point into.
fn create_private_dir(dir: &std::path::Path) -> Result<(), NodeError> {
    use crate::fileutil;
    if dir.is_dir() {
        return Ok(());
    }
    fileutil::create_dir_all(dir)
        .and_then(|()| fileutil::fsync_dir(fileutil::parent_dir(dir)))
        .map_err(|source| NodeError::Io {
            context: format!("cannot create the snapshot directory {}", dir.display()),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower installed a snapshot at index 10 (marker, then commit 10) after entries 1..3;
    /// its snapshot file is then lost. Start-up falls back to no snapshot and finds the commit
    /// beyond the entries: a clear WAL error, not a raft-rs panic.
    #[test]
    fn a_commit_beyond_the_replayed_entries_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::new(1, vec!["http://127.0.0.1:1".into()]);
        cfg.data_dir = dir.path().to_path_buf();
        let snapshotter = Snapshotter::new(cfg.snap_dir());
        let replayed = open_or_bootstrap(&cfg, &snapshotter).expect("bootstrap");
        let mut wal = replayed.wal;
        let ents: Vec<Entry> = (2..=3)
            .map(|index| Entry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect();
        let hs = |commit| HardState {
            term: 2,
            commit,
            ..Default::default()
        };
        wal.save(&hs(3), &ents).expect("save");
        wal.save_snapshot(&WalSnapshot {
            index: 10,
            term: 2,
            conf_state: None,
        })
        .expect("marker");
        wal.save(&hs(10), &[]).expect("commit");
        wal.close().expect("close");

        let err = open_or_bootstrap(&cfg, &snapshotter)
            .err()
            .expect("refuses to start");
        let msg = err.to_string();
        assert!(
            msg.contains("commits index 10") && msg.contains("end at 3"),
            "{msg}"
        );
    }

    #[test]
    fn bootstrap_writes_one_committed_add_node_per_member() {
        let peers = vec!["http://a:1".to_string(), "http://b:2".to_string()];
        let (hs, ents, cs) = bootstrap_entries(&peers);
        assert_eq!((hs.term, hs.vote, hs.commit), (1, 0, 2));
        assert_eq!(cs.voters, vec![1, 2]);
        for (i, e) in ents.iter().enumerate() {
            let mut cc = ConfChange::default();
            cc.merge_from_bytes(&e.data).expect("decodes");
            assert_eq!((e.index, e.term), (i as u64 + 1, 1));
            assert_eq!(cc.node_id, i as u64 + 1);
            assert_eq!(cc.get_change_type(), ConfChangeType::AddNode);
            assert_eq!(&cc.context[..], peers[i].as_bytes());
        }
    }
}
