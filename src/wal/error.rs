//! `WalError`: everything that can go wrong with the write-ahead log.
//!
//! Damage is reported with the segment path and the byte offset of the frame that failed,
//! and says what an operator can do. A torn tail (a crash in the middle of the last write) is
//! not an error: [`super::Wal::read_all`] repairs it and logs a warning.

use std::io;
use std::path::PathBuf;

/// What an operator can do about a damaged log. Raft can rebuild a member from its peers,
/// but only as a *new* member: the old log must not be trusted.
pub const RECOVERY_HINT: &str = "the log cannot be trusted past this point; \
to recover, restore this member from its peers: stop it, move the data directory \
(WAL and snapshots) aside, remove the member from the cluster and add a new one in its place \
(see the README, \"When a node refuses to start\"); a one-member cluster can only be \
restored from a backup";

/// Errors of the WAL.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// `create` on a directory that already holds `.wal` files.
    #[error("wal: {dir} already contains a write-ahead log; refusing to create a new one over it")]
    AlreadyExists {
        /// The WAL directory.
        dir: PathBuf,
    },

    /// No segment files where a WAL was expected.
    #[error("wal: no .wal segment files in {dir}")]
    FileNotFound {
        /// The WAL directory.
        dir: PathBuf,
    },

    /// No segment starts at or before the snapshot we were asked to open at.
    #[error(
        "wal: no segment in {dir} starts at or before snapshot index {index} \
         (oldest segment is {oldest}); the segments this snapshot needs were deleted or lost"
    )]
    NoSegmentForIndex {
        /// The WAL directory.
        dir: PathBuf,
        /// The requested snapshot index.
        index: u64,
        /// Name of the oldest segment present.
        oldest: String,
    },

    /// A segment is missing between two others.
    #[error(
        "wal: segment missing in {dir}: {prev} is followed by {next} (sequence numbers must be \
         consecutive); {hint}",
        hint = RECOVERY_HINT
    )]
    SequenceGap {
        /// The WAL directory.
        dir: PathBuf,
        /// The segment before the gap.
        prev: String,
        /// The segment after the gap.
        next: String,
    },

    /// Another process (or another `Wal` in this one) holds the lock.
    #[error(
        "wal: {dir} is in use: the lock on {path} is held by another process (or another open \
         Wal); stop the other raftexample using this data directory"
    )]
    Locked {
        /// The WAL directory.
        dir: PathBuf,
        /// The segment whose lock could not be taken.
        path: PathBuf,
    },

    /// A record failed to decode or its checksum did not match, and it is not a torn tail.
    #[error("wal: corrupt record in {path} at byte offset {offset}: {reason}; {hint}", hint = RECOVERY_HINT)]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Offset of the frame (its length field) in that file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// Segments disagree about the metadata (etcd `ErrMetadataConflict`).
    #[error(
        "wal: conflicting metadata in {path} at byte offset {offset}: every segment must carry the same metadata"
    )]
    MetadataConflict {
        /// The segment file.
        path: PathBuf,
        /// Offset of the metadata record.
        offset: u64,
    },

    /// The snapshot marker at the requested index has another term (etcd `ErrSnapshotMismatch`).
    #[error(
        "wal: snapshot mismatch in {path} at byte offset {offset}: marker for index {index} has \
         term {found_term}, expected {want_term}; the snapshot file and the WAL disagree"
    )]
    SnapshotMismatch {
        /// The segment file.
        path: PathBuf,
        /// Offset of the marker record.
        offset: u64,
        /// The snapshot index.
        index: u64,
        /// Term we were asked to open at.
        want_term: u64,
        /// Term found in the log.
        found_term: u64,
    },

    /// The WAL was opened at a snapshot whose marker is not in the log (etcd `ErrSnapshotNotFound`,
    /// which etcd's `Open` in write mode loses; we report it).
    #[error(
        "wal: snapshot marker (index {index}, term {term}) not found in {dir}; open the WAL at a \
         snapshot it recorded (see valid_snapshot_entries)"
    )]
    SnapshotNotFound {
        /// The WAL directory.
        dir: PathBuf,
        /// Requested index.
        index: u64,
        /// Requested term.
        term: u64,
    },

    /// An entry's index leaves a hole after the entries read so far (etcd `ErrSliceOutOfRange`).
    #[error(
        "wal: entry index {index} in {path} at byte offset {offset} does not follow the {have} \
         entries read after snapshot index {snap_index}; {hint}",
        hint = RECOVERY_HINT
    )]
    EntryGap {
        /// The segment file.
        path: PathBuf,
        /// Offset of the entry record.
        offset: u64,
        /// The entry's index.
        index: u64,
        /// Entries kept so far.
        have: usize,
        /// Index of the snapshot opened at.
        snap_index: u64,
    },

    /// The hard state commits beyond the entries replayed: the log was compacted into a
    /// snapshot whose file is missing or unreadable, so start-up fell back to an older one.
    #[error(
        "wal: {dir} commits index {commit} but its entries after snapshot index {snap_index} \
         end at {last_index}; the snapshot file the log was compacted into is missing or \
         unreadable (look in the -snap directory for .broken files); {hint}",
        hint = RECOVERY_HINT
    )]
    CommitBeyondEntries {
        /// The WAL directory.
        dir: PathBuf,
        /// The commit index in the last hard state.
        commit: u64,
        /// The last entry's index (or the snapshot's, if none follow it).
        last_index: u64,
        /// Index of the snapshot the WAL was opened at.
        snap_index: u64,
    },

    /// `save`/`save_snapshot` before `read_all` on an opened WAL.
    #[error("wal: read_all must be called on an opened WAL before appending to it")]
    NotRead,

    /// `read_all` called twice, or on a created WAL.
    #[error("wal: read_all can only be called once, on a WAL returned by open")]
    AlreadyRead,

    /// An I/O error, with the operation and the path.
    #[error("wal: {op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl WalError {
    /// Builds a closure mapping an `io::Error` to [`WalError::Io`].
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> WalError {
        let path = path.into();
        move |source| WalError::Io { op, path, source }
    }
}
