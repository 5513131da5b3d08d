//! The write-ahead log: raft's durable memory (a port of etcd v3.4's `wal` package, on-disk
//! compatible byte for byte).
//!
//! # Lifecycle
//!
//! ```text
//! Wal::create(dir, metadata)                 new log: crc(0), metadata, snapshot marker {0,0}
//!   save(hard_state, entries)                append; fsync when raft requires it
//!   save_snapshot(&WalSnapshot)              after writing a snapshot file: record its marker
//!   release_lock_to(index)                   after a snapshot: drop segments it covers
//!   close()
//! Wal::open(dir, &snapshot)                  reopen at a snapshot recorded in the log
//!   read_all() -> (metadata, hard_state, entries after the snapshot)   before any save
//! ```
//!
//! The snapshot passed to `open` must be one whose marker the log holds (an empty
//! `WalSnapshot` for "no snapshot": `create` writes that marker). Use [`valid_snapshot_entries`]
//! to list the markers that are safe to start from, and pick the newest snapshot file among them.
//!
//! # Files
//!
//! A WAL is a directory of segments named `%016x-%016x.wal`: a sequence number and the raft
//! index of the first entry expected in the segment. The first is
//! `0000000000000000-0000000000000000.wal`. When a save leaves the current segment at or beyond
//! the segment size (64,000,000 bytes), the log is *cut*: the segment is truncated to its data
//! and a new one is started, e.g. `0000000000000001-0000000000000021.wal` after entry 0x20.
//! Every segment is preallocated to the full size (zeros mark the end of data), and the next one
//! is prepared in the background (`file_pipeline`) as `0.tmp`/`1.tmp`.
//!
//! A new segment begins with a crc record carrying the running checksum, the metadata record
//! and the last hard state, so each segment can be read on its own. A new WAL is built in
//! `<dir>.tmp` and renamed into place; every create, rename and delete is followed by an fsync
//! of the directory. Segments are locked (`flock`) while a `Wal` holds them, so a second
//! process fails with [`WalError::Locked`].
//!
//! # Records
//!
//! Each segment is a sequence of frames (format in `encoder`), each holding a `walpb.Record`
//! (format in `record`): metadata 1, entry 2, hard state 3, crc 4, snapshot marker 5. The CRC
//! is CRC-32C chained over the data of every record of every segment.
//!
//! # Durability
//!
//! `save` fsyncs (`fdatasync`) once per call when raft requires it: when there are new entries
//! or the term or vote changed. A commit-only hard-state change is buffered and becomes durable
//! with the next sync. `save_snapshot`, `sync`, `close` and a cut always sync. After a failed
//! write or fsync the `Wal` refuses further writes: the kernel may have dropped the dirty pages,
//! so retrying could report success for data that is gone.
//!
//! # Crashes and damage
//!
//! `read_all` repairs a torn write at the end of the last segment (see `repair`): the partial
//! frame was never acknowledged, so it is cut off with a warning. Any other damage (a checksum
//! mismatch, a malformed record, non-zero padding, a missing segment) fails with the segment
//! path and byte offset. One blind spot is inherited from the format: the CRC covers a record's
//! data but not its type, so a bit flip turning e.g. an entry (2) into a hard state (3) is only
//! caught by the checks that follow (a gap in entry indexes, conflicting metadata).
//!
//! # Beyond raftexample
//!
//! - `release_lock_to` also **deletes** the released segments (and any older ones left from
//!   before the open point), so disk use stays bounded; raftexample never purges, and etcd server
//!   deletes them separately (`--max-wals`).
//! - No maximum record size (etcd v3.4 refused records over 10 MiB at read time).
//! - Opening at a snapshot whose marker is missing is an error (etcd's `Open` loses it).

mod decoder;
mod encoder;
mod error;
mod file_pipeline;
pub(crate) mod pb;
mod read;
mod record;
mod repair;
mod util;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfState, Entry, HardState};

use encoder::Encoder;
pub use error::{RECOVERY_HINT, WalError};
use file_pipeline::FilePipeline;
pub use read::valid_snapshot_entries;
use record::RecordType;
use util::{SegmentName, wal_name};

/// Default segment size (etcd `SegmentSizeBytes`: 64 * 1000 * 1000).
pub const SEGMENT_SIZE_BYTES: u64 = 64 * 1000 * 1000;

/// An fsync slower than this is logged (etcd `warnSyncDuration`).
const WARN_SYNC_DURATION: Duration = Duration::from_secs(1);

/// A snapshot marker (`walpb.Snapshot`): the index and term of a snapshot, and its membership.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WalSnapshot {
    /// Index of the last entry the snapshot covers.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// Membership at that index (etcd 3.5+ records it; v3.4 readers skip it).
    pub conf_state: Option<ConfState>,
}

/// Tunables (for tests, mostly).
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Size at which a segment is cut, and to which segments are preallocated.
    pub segment_size: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: SEGMENT_SIZE_BYTES,
        }
    }
}

/// A segment this `Wal` holds locked.
struct Segment {
    path: PathBuf,
    seq: u64,
    index: u64,
    file: File,
}

/// An open write-ahead log. See the module documentation for the lifecycle.
///
/// Dropping a `Wal` without [`Wal::close`] releases its locks but does not sync: a buffered
/// commit-only hard state is lost (which raft tolerates; entries, term and vote are always
/// synced by `save`).
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    /// Metadata recorded at the head of every segment.
    metadata: Vec<u8>,
    /// Last hard state saved (or read), repeated at the head of each new segment.
    state: HardState,
    /// Snapshot `read_all` starts from.
    start: WalSnapshot,
    /// Index of the last entry saved.
    enti: u64,
    /// Locked segments, oldest first; the last one is the tail being appended to.
    segments: Vec<Segment>,
    /// Present once the log can be appended to (after `create`, or `open` + `read_all`).
    encoder: Option<Encoder>,
    pipeline: Option<FilePipeline>,
    /// Set after a failed write or fsync.
    broken: bool,
}

/// `Exist`: whether `dir` holds a WAL (at least one segment file); an error if `dir` exists
/// but cannot be read.
pub fn exist(dir: &Path) -> Result<bool, WalError> {
    util::exist(dir)
}

/// Locks and opens the segments `names` of `dir`.
fn lock_segments(dir: &Path, names: &[SegmentName]) -> Result<Vec<Segment>, WalError> {
    names
        .iter()
        .map(|n| {
            let path = dir.join(&n.name);
            match crate::fileutil::try_lock_file(&path, false) {
                Ok(file) => Ok(Segment {
                    path,
                    seq: n.seq,
                    index: n.index,
                    file,
                }),
                Err(crate::fileutil::LockError::WouldBlock) => Err(WalError::Locked {
                    dir: dir.into(),
                    path,
                }),
                Err(crate::fileutil::LockError::Io(e)) => {
                    Err(WalError::io("open segment", path)(e))
                }
            }
        })
        .collect()
}

impl Wal {
    /// `Exist`: whether `dir` holds a WAL; an error if `dir` exists but cannot be read.
    pub fn exist(dir: &Path) -> Result<bool, WalError> {
        exist(dir)
    }

    /// Creates a WAL in `dir` with the default options.
    pub fn create(dir: &Path, metadata: &[u8]) -> Result<Wal, WalError> {
        Self::create_with(dir, metadata, WalOptions::default())
    }

    /// Creates a WAL in `dir`, writing `metadata` at the head of every segment.
    ///
    /// Fails if `dir` already holds segments. An existing `dir` without segments is replaced
    /// (as etcd does). The log is built in `<dir>.tmp`, synced, and renamed into place, so a
    /// crash leaves either no WAL or a complete one.
    pub fn create_with(dir: &Path, metadata: &[u8], opts: WalOptions) -> Result<Wal, WalError> {
        if exist(dir)? {
            return Err(WalError::AlreadyExists { dir: dir.into() });
        }
        let mut tmp = dir.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        if crate::fileutil::exist(&tmp) {
            std::fs::remove_dir_all(&tmp).map_err(WalError::io("remove stale", &tmp))?;
        }
        crate::fileutil::create_dir_all(&tmp).map_err(WalError::io("create directory", &tmp))?;

        let name = wal_name(0, 0);
        let path = tmp.join(&name);
        let file = crate::fileutil::try_lock_file(&path, true).map_err(|e| match e {
            crate::fileutil::LockError::WouldBlock => WalError::Locked {
                dir: tmp.clone(),
                path: path.clone(),
            },
            crate::fileutil::LockError::Io(e) => WalError::io("create segment", &path)(e),
        })?;
        crate::fileutil::preallocate(&file, opts.segment_size)
            .map_err(WalError::io("preallocate", &path))?;

        let mut w = Wal {
            dir: tmp.clone(),
            opts,
            metadata: metadata.to_vec(),
            state: HardState::default(),
            start: WalSnapshot::default(),
            enti: 0,
            segments: vec![Segment {
                path,
                seq: 0,
                index: 0,
                file,
            }],
            encoder: Some(Encoder::new(0, 0)),
            pipeline: None,
            broken: false,
        };
        w.encode(RecordType::Crc, &[])?;
        let md = std::mem::take(&mut w.metadata);
        let res = w.encode(RecordType::Metadata, &md);
        w.metadata = md;
        res?;
        w.save_snapshot(&WalSnapshot::default())?;
        crate::fileutil::fsync_dir(&tmp).map_err(WalError::io("fsync directory", &tmp))?;

        if crate::fileutil::exist(dir) {
            std::fs::remove_dir_all(dir).map_err(WalError::io("remove empty", dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(WalError::io("rename new WAL directory to", dir))?;
        let parent = crate::fileutil::parent_dir(dir);
        crate::fileutil::fsync_dir(parent).map_err(WalError::io("fsync directory", parent))?;

        w.dir = dir.to_path_buf();
        w.segments[0].path = dir.join(name);
        w.pipeline = Some(FilePipeline::new(dir, w.opts.segment_size)?);
        Ok(w)
    }

    /// Opens the WAL in `dir` at snapshot `snap`, with the default options.
    pub fn open(dir: &Path, snap: &WalSnapshot) -> Result<Wal, WalError> {
        Self::open_with(dir, snap, WalOptions::default())
    }

    /// Opens the WAL in `dir` for reading from `snap` on, and later appending.
    ///
    /// Locks the segments from the last one starting at or before `snap.index` to the end.
    /// [`Wal::read_all`] must be called before appending.
    pub fn open_with(dir: &Path, snap: &WalSnapshot, opts: WalOptions) -> Result<Wal, WalError> {
        let names = util::select_wal_files(dir, snap.index)?;
        let segments = lock_segments(dir, &names)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            opts,
            metadata: Vec::new(),
            state: HardState::default(),
            start: snap.clone(),
            enti: 0,
            segments,
            encoder: None,
            pipeline: None,
            broken: false,
        })
    }

    /// Reads the log from the snapshot `open` was given: returns the metadata, the last hard
    /// state and the entries after the snapshot. A later entry at index `i` replaces everything
    /// from `i` on (a new leader overwrote an uncommitted suffix).
    ///
    /// A torn write at the end of the last segment is repaired (warning logged, damaged segment
    /// copied to `<segment>.broken`). Afterwards the log is ready for appending.
    ///
    /// # Errors
    /// Corruption ([`WalError::Corrupt`] with path and offset), [`WalError::SnapshotNotFound`]
    /// if the snapshot's marker is not in the log, [`WalError::SnapshotMismatch`],
    /// [`WalError::MetadataConflict`], [`WalError::EntryGap`], I/O errors.
    pub fn read_all(&mut self) -> Result<(Vec<u8>, HardState, Vec<Entry>), WalError> {
        if self.encoder.is_some() {
            return Err(WalError::AlreadyRead);
        }
        let mut handles = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            let f = s
                .file
                .try_clone()
                .map_err(WalError::io("open segment", &s.path))?;
            handles.push((s.path.clone(), f));
        }
        let from_log_start = self.segments.first().is_some_and(|s| s.seq == 0);
        let r = read::replay(handles, from_log_start, &self.start)?;
        // Refuse before touching anything: a refused start must leave the files as they were.
        if !r.matched {
            return Err(WalError::SnapshotNotFound {
                dir: self.dir.clone(),
                index: self.start.index,
                term: self.start.term,
            });
        }
        if let Some((offset, reason)) = &r.torn {
            let tail = self.tail()?;
            repair::repair_torn_tail(&tail.file, &tail.path, *offset, reason)?;
        }
        self.encoder = Some(Encoder::new(r.last_crc, r.last_offset));
        self.enti = r.enti;
        self.metadata = r.metadata.clone();
        self.state = r.state.clone();
        self.start = WalSnapshot::default();
        self.pipeline = Some(FilePipeline::new(&self.dir, self.opts.segment_size)?);
        Ok((r.metadata, r.state, r.ents))
    }

    fn tail(&self) -> Result<&Segment, WalError> {
        self.segments.last().ok_or(WalError::FileNotFound {
            dir: self.dir.clone(),
        })
    }

    /// Checks the log is writable and returns the encoder and the tail file.
    fn writer(&mut self) -> Result<(&mut Encoder, &Segment), WalError> {
        if self.broken {
            return Err(WalError::Io {
                op: "append to",
                path: self.dir.clone(),
                source: std::io::Error::other(
                    "an earlier write or fsync failed; the WAL must be reopened",
                ),
            });
        }
        let tail = self.segments.last().ok_or(WalError::FileNotFound {
            dir: self.dir.clone(),
        })?;
        let enc = self.encoder.as_mut().ok_or(WalError::NotRead)?;
        Ok((enc, tail))
    }

    /// Marks the log broken if `r` is an error.
    fn check<T>(&mut self, r: std::io::Result<T>, op: &'static str) -> Result<T, WalError> {
        r.map_err(|e| {
            self.broken = true;
            let path = self
                .segments
                .last()
                .map_or_else(|| self.dir.clone(), |s| s.path.clone());
            WalError::Io {
                op,
                path,
                source: e,
            }
        })
    }

    fn encode(&mut self, rec_type: RecordType, data: &[u8]) -> Result<(), WalError> {
        let (enc, tail) = self.writer()?;
        let r = enc.encode(&tail.file, rec_type, data);
        self.check(r, "write")
    }

    /// Appends `ents` and, if not empty, `hs`; fsyncs once if raft requires it (new entries,
    /// or a new term or vote). Cuts a new segment when the current one is full.
    pub fn save(&mut self, hs: &HardState, ents: &[Entry]) -> Result<(), WalError> {
        let hs_empty = is_empty_hard_state(hs);
        if hs_empty && ents.is_empty() {
            return Ok(());
        }
        let must_sync = must_sync(hs, &self.state, ents.len());
        let (enc, tail) = self.writer()?;
        let mut r = Ok(());
        for e in ents {
            r = enc.encode_entry(&tail.file, e);
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() && !hs_empty {
            r = enc.encode_state(&tail.file, hs);
        }
        // etcd compares the file position, i.e. what was written before this save's flush, so
        // a segment is cut one save after it crosses the size. Same rule here, which keeps our
        // segment boundaries (and so our files) identical to etcd's for the same saves.
        let full = enc.flushed() >= self.opts.segment_size;
        self.check(r, "write")?;
        if let Some(last) = ents.last() {
            self.enti = last.index;
        }
        if !hs_empty {
            self.state = hs.clone();
        }
        if full {
            return self.cut();
        }
        if must_sync {
            return self.sync();
        }
        Ok(())
    }

    /// Appends a snapshot marker and fsyncs. Call it after the snapshot file itself is durable.
    pub fn save_snapshot(&mut self, snap: &WalSnapshot) -> Result<(), WalError> {
        let mut data = Vec::new();
        record::encode_wal_snapshot(&mut data, snap);
        self.encode(RecordType::Snapshot, &data)?;
        if self.enti < snap.index {
            self.enti = snap.index;
        }
        self.sync()
    }

    /// Writes buffered records and `fdatasync`s the tail segment.
    pub fn sync(&mut self) -> Result<(), WalError> {
        let (enc, tail) = self.writer()?;
        let started = Instant::now();
        let r = enc.flush(&tail.file).and_then(|()| tail.file.sync_data());
        let took = started.elapsed();
        self.check(r, "fdatasync")?;
        if took > WARN_SYNC_DURATION {
            tracing::warn!(took = ?took, expected = ?WARN_SYNC_DURATION, "slow fdatasync of the WAL");
        }
        Ok(())
    }

    /// Closes the full tail segment and starts the next one (etcd `cut`).
    fn cut(&mut self) -> Result<(), WalError> {
        let (enc, tail) = self.writer()?;
        let off = enc.offset();
        let prev_crc = enc.crc();
        let r = enc
            .flush(&tail.file)
            .and_then(|()| tail.file.set_len(off))
            .and_then(|()| tail.file.sync_data());
        let (seq, tail_path) = (tail.seq, tail.path.clone());
        self.check(r, "truncate and fsync full segment")?;

        let pipeline = self.pipeline.as_mut().ok_or(WalError::NotRead)?;
        let (tmp_path, file) = pipeline.open()?;
        let mut enc = Encoder::new(prev_crc, 0);
        let mut r = enc
            .encode(&file, RecordType::Crc, &[])
            .and_then(|()| enc.encode(&file, RecordType::Metadata, &self.metadata));
        if r.is_ok() && !is_empty_hard_state(&self.state) {
            r = enc.encode_state(&file, &self.state);
        }
        let r = r
            .and_then(|()| enc.flush(&file))
            .and_then(|()| file.sync_data());
        self.check(r, "write new segment header")?;

        let (seq, index) = (seq + 1, self.enti + 1);
        let path = self.dir.join(wal_name(seq, index));
        let r = std::fs::rename(&tmp_path, &path);
        self.check(r, "rename new segment")?;
        let r = crate::fileutil::fsync_dir(&self.dir);
        self.check(r, "fsync WAL directory")?;
        tracing::info!(path = %path.display(), previous = %tail_path.display(), "created a new WAL segment");
        self.segments.push(Segment {
            path,
            seq,
            index,
            file,
        });
        self.encoder = Some(enc);
        Ok(())
    }

    /// etcd `ReleaseLockTo`: unlocks the segments entirely before the last segment whose first
    /// index is below `index` (holding 1..6, `release_lock_to(4)` releases 1 and 2), and — beyond
    /// etcd — deletes them, together with any older segment still on disk, so the log does not
    /// grow without bound. Call it with the index of a snapshot that is durable and recorded
    /// (`save_snapshot`): nothing at or after that snapshot's segment is touched.
    pub fn release_lock_to(&mut self, index: u64) -> Result<(), WalError> {
        let keep_from = match self.segments.iter().position(|s| s.index >= index) {
            Some(i) => i.saturating_sub(1),
            None => self.segments.len().saturating_sub(1),
        };
        if keep_from == 0 {
            return Ok(());
        }
        let released: Vec<Segment> = self.segments.drain(..keep_from).collect();
        drop(released); // closing the files releases their locks
        let first_kept = self.segments[0].seq;
        let mut removed = 0;
        for n in util::read_wal_names(&self.dir)? {
            if n.seq < first_kept {
                let path = self.dir.join(&n.name);
                std::fs::remove_file(&path)
                    .map_err(WalError::io("remove released segment", &path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            crate::fileutil::fsync_dir(&self.dir)
                .map_err(WalError::io("fsync directory", &self.dir))?;
            tracing::info!(dir = %self.dir.display(), removed, index, "removed WAL segments covered by a snapshot");
        }
        Ok(())
    }

    /// Total size in bytes of the segment files (preallocated space included).
    pub fn size_on_disk(&self) -> u64 {
        util::read_wal_names(&self.dir)
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| std::fs::metadata(self.dir.join(&n.name)).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The WAL directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the file pipeline, syncs the tail and releases the locks.
    pub fn close(mut self) -> Result<(), WalError> {
        self.pipeline = None;
        if self.encoder.is_some() && !self.broken {
            self.sync()?;
        }
        Ok(())
    }
}

/// raft `MustSync`: whether a save must be fsynced before raft may act on it (send votes or
/// append responses). Entries, term and vote must survive a crash; the commit index need not,
/// raft re-learns it from the leader.
fn must_sync(st: &HardState, prev: &HardState, entsnum: usize) -> bool {
    entsnum != 0 || st.vote != prev.vote || st.term != prev.term
}

/// raft `IsEmptyHardState`.
fn is_empty_hard_state(hs: &HardState) -> bool {
    hs.term == 0 && hs.vote == 0 && hs.commit == 0
}
