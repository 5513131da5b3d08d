//! The snapshotter: raft snapshots as files (a port of etcd v3.4's `etcdserver/api/snap`,
//! on-disk compatible).
//!
//! # Files
//!
//! One file per snapshot in the snapshot directory (`raftexample-<id>-snap/`), named
//! `%016x-%016x.snap` from the snapshot's **term, then index**, so that reverse lexicographic
//! order is newest first. The content is a `snappb.Snapshot`:
//!
//! ```proto
//! message snapshot { optional uint32 crc = 1;    // always written
//!                    optional bytes  data = 2; } // the marshaled raftpb.Snapshot
//! ```
//!
//! where `crc` is the plain CRC-32C (Castagnoli) of `data` (not chained, unlike the WAL).
//!
//! # Durability (beyond etcd)
//!
//! etcd writes the file in place and fsyncs it, so a crash can leave a truncated `.snap`. We
//! write `<name>.snap.tmp`, fsync it, rename it into place and fsync the directory: a `.snap`
//! file is either complete or absent. Call [`Snapshotter::save_snap`] *before* recording the
//! snapshot in the WAL (`Wal::save_snapshot`): a snapshot file without a WAL marker is ignored
//! at restart, whereas a marker without its file would be a hole.
//!
//! # Loading
//!
//! Files are tried newest first. One that cannot be read (empty, malformed, zero or wrong CRC,
//! empty data) is renamed `<name>.broken` with a warning, and the next older one is tried.
//! [`Snapshotter::load_newest_available`] additionally skips snapshots that the WAL does not
//! record as durable (see `wal::valid_snapshot_entries`).
//!
//! # Retention (beyond raftexample)
//!
//! raftexample keeps every snapshot file forever. After each successful save we keep the newest
//! [`DEFAULT_MAX_SNAPSHOTS`] (etcd server's `--max-snapshots` default; at least 2, so the
//! previous snapshot remains if a crash separates the new file from its WAL marker) and delete
//! older ones; [`Snapshotter::with_max_snapshots`] changes or disables this.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use raft::eraftpb::Snapshot;

use crate::fileutil;
use crate::wal::WalSnapshot;
use crate::wal::pb::{self, Reader, Value};

#[cfg(test)]
mod tests;

/// Snapshot files kept by default after a save.
pub const DEFAULT_MAX_SNAPSHOTS: usize = 5;

const SNAP_SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".snap.tmp";

/// Errors of the snapshotter.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// No usable snapshot file (etcd `ErrNoSnapshot`).
    #[error("snap: no available snapshot in {dir}")]
    NoSnapshot {
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// An empty file, or empty data / zero crc (etcd `ErrEmptySnapshot`).
    #[error("snap: empty snapshot in {path}")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The stored CRC does not match the data (etcd `ErrCRCMismatch`).
    #[error("snap: crc mismatch in {path}: file says {stored:#010x}, data gives {computed:#010x}")]
    CrcMismatch {
        /// The file.
        path: PathBuf,
        /// CRC stored in the file.
        stored: u32,
        /// CRC of the data.
        computed: u32,
    },
    /// The file or the snapshot inside it does not decode.
    #[error("snap: corrupt snapshot file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error.
    #[error("snap: {op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapError {
    let path = path.to_path_buf();
    move |source| SnapError::Io { op, path, source }
}

/// `%016x-%016x.snap` (term, index).
pub fn snap_name(term: u64, index: u64) -> String {
    format!("{term:016x}-{index:016x}{SNAP_SUFFIX}")
}

/// Serializes `snap` as a `.snap` file's content.
pub fn encode_snap_file(snap: &Snapshot) -> Vec<u8> {
    let parts = SnapFile::new(snap);
    [&parts.head[..], parts.data, &parts.tail[..]].concat()
}

/// A `.snap` file's content as `head + data + tail`, where `data` is the snapshot's payload
/// borrowed, not copied. The payload is the whole key-value store (megabytes); building the
/// file in one buffer would copy it twice (into the `raftpb.Snapshot`, then into the
/// `snappb.Snapshot` around it) on the raft thread for every snapshot.
struct SnapFile<'a> {
    /// `crc` field, header of the outer `data` field, header of the inner `data` field.
    head: Vec<u8>,
    /// `Snapshot.data`.
    data: &'a [u8],
    /// The inner `metadata` field.
    tail: Vec<u8>,
}

impl<'a> SnapFile<'a> {
    fn new(snap: &'a Snapshot) -> SnapFile<'a> {
        // The marshaled raftpb.Snapshot is [data field header][data][metadata field].
        let mut data_header = Vec::new();
        if !snap.data.is_empty() {
            pb::put_uvarint(&mut data_header, (1 << 3) | 2);
            pb::put_uvarint(&mut data_header, snap.data.len() as u64);
        }
        let mut tail = Vec::new();
        let mut meta_only = Snapshot::default();
        meta_only.set_metadata(snap.get_metadata().clone());
        pb::encode_snapshot(&mut tail, &meta_only);
        let inner_len = data_header.len() + snap.data.len() + tail.len();
        let crc = crc32c::crc32c_append(
            crc32c::crc32c_append(crc32c::crc32c(&data_header), &snap.data),
            &tail,
        );
        let mut head = Vec::with_capacity(32);
        pb::put_varint_field(&mut head, 1, u64::from(crc));
        pb::put_uvarint(&mut head, (2 << 3) | 2);
        pb::put_uvarint(&mut head, inner_len as u64);
        head.extend_from_slice(&data_header);
        SnapFile {
            head,
            data: &snap.data,
            tail,
        }
    }
}

/// etcd `snap.Read`: reads and verifies one snapshot file.
pub fn read(path: &Path) -> Result<Snapshot, SnapError> {
    let bytes = std::fs::read(path).map_err(io_err("read", path))?;
    if bytes.is_empty() {
        return Err(SnapError::Empty { path: path.into() });
    }
    let corrupt = |e: pb::PbError| SnapError::Corrupt {
        path: path.into(),
        reason: e.to_string(),
    };
    let (mut crc, mut data) = (0u32, &[][..]);
    let mut r = Reader::new(&bytes);
    while let Some((field, v)) = r.next_field().map_err(corrupt)? {
        let at = r.position();
        match (field, v) {
            (1, Value::Varint(c)) => {
                crc = u32::try_from(c).map_err(|_| SnapError::Corrupt {
                    path: path.into(),
                    reason: format!("crc {c:#x} does not fit in 32 bits"),
                })?;
            }
            (2, v) => data = pb::as_bytes(v, at).map_err(corrupt)?,
            (1, _) => {
                return Err(SnapError::Corrupt {
                    path: path.into(),
                    reason: "crc field has the wrong wire type".into(),
                });
            }
            _ => {}
        }
    }
    if data.is_empty() || crc == 0 {
        return Err(SnapError::Empty { path: path.into() });
    }
    let computed = crc32c::crc32c(data);
    if computed != crc {
        return Err(SnapError::CrcMismatch {
            path: path.into(),
            stored: crc,
            computed,
        });
    }
    pb::decode_snapshot(data).map_err(corrupt)
}

/// Saves and loads snapshot files in one directory.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    dir: PathBuf,
    max_snapshots: Option<usize>,
}

impl Snapshotter {
    /// A snapshotter for `dir` (created on the first save), keeping the newest
    /// [`DEFAULT_MAX_SNAPSHOTS`] files.
    pub fn new(dir: impl Into<PathBuf>) -> Snapshotter {
        Snapshotter {
            dir: dir.into(),
            max_snapshots: Some(DEFAULT_MAX_SNAPSHOTS),
        }
    }

    /// Keeps at most `max` snapshot files (at least 2) after a save; `None` keeps all of them,
    /// as raftexample does.
    pub fn with_max_snapshots(mut self, max: Option<usize>) -> Snapshotter {
        self.max_snapshots = max.map(|m| m.max(2));
        self
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `snap` durably as `<term>-<index>.snap`. A snapshot with index 0 (raft's empty
    /// snapshot) is not written.
    pub fn save_snap(&self, snap: &Snapshot) -> Result<(), SnapError> {
        let meta = snap.get_metadata();
        if meta.index == 0 {
            return Ok(());
        }
        fileutil::create_dir_all(&self.dir).map_err(io_err("create directory", &self.dir))?;
        let name = snap_name(meta.term, meta.index);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(
            "{}{}",
            &name[..name.len() - SNAP_SUFFIX.len()],
            TMP_SUFFIX
        ));
        let content = SnapFile::new(snap);
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(fileutil::PRIVATE_FILE_MODE)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&content.head)?;
                f.write_all(content.data)?;
                f.write_all(&content.tail)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            if let Err(rm) = std::fs::remove_file(&tmp) {
                tracing::warn!(path = %tmp.display(), error = %rm, "failed to remove a partial snapshot file");
            }
            return Err(io_err("write snapshot", &path)(e));
        }
        fileutil::fsync_dir(&self.dir).map_err(io_err("fsync directory", &self.dir))?;
        if let Some(max) = self.max_snapshots {
            self.purge(max);
        }
        Ok(())
    }

    /// Deletes snapshot files beyond the newest `max`, and leftover temporary files. Failures
    /// are logged only: the new snapshot is already safe.
    fn purge(&self, max: usize) {
        let names = match self.snap_names() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list snapshots to purge");
                return;
            }
        };
        for name in names.iter().skip(max) {
            let p = self.dir.join(name);
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::info!(path = %p.display(), "purged old snapshot file"),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "failed to purge old snapshot file")
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// `.snap` file names, newest first.
    fn snap_names(&self) -> Result<Vec<String>, SnapError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read directory", &self.dir)(e)),
        };
        let mut names = Vec::new();
        for e in rd {
            let e = e.map_err(io_err("read directory", &self.dir))?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if name.ends_with(SNAP_SUFFIX) {
                names.push(name);
            } else if !name.ends_with(".broken") && !name.ends_with(TMP_SUFFIX) {
                tracing::debug!(file = %name, "skipped unexpected non-snapshot file");
            }
        }
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(names)
    }

    /// The newest readable snapshot ([`SnapError::NoSnapshot`] if there is none).
    pub fn load(&self) -> Result<Snapshot, SnapError> {
        self.load_matching(|_| true)
    }

    /// The newest readable snapshot whose (term, index) is among `wal_snaps` (the WAL's
    /// durable snapshot markers).
    pub fn load_newest_available(&self, wal_snaps: &[WalSnapshot]) -> Result<Snapshot, SnapError> {
        self.load_matching(|s| {
            let m = s.get_metadata();
            wal_snaps
                .iter()
                .any(|w| w.term == m.term && w.index == m.index)
        })
    }

    fn load_matching(&self, accept: impl Fn(&Snapshot) -> bool) -> Result<Snapshot, SnapError> {
        for name in self.snap_names()? {
            let path = self.dir.join(&name);
            match read(&path) {
                Ok(s) if accept(&s) => return Ok(s),
                Ok(_) => {}
                // An I/O error (permissions, EIO, too many open files) says nothing about the
                // file's contents: fail, rather than hide a good snapshot as `.broken`.
                Err(e @ SnapError::Io { .. }) => return Err(e),
                Err(e) => self.set_aside(&path, &e),
            }
        }
        Err(SnapError::NoSnapshot {
            dir: self.dir.clone(),
        })
    }

    /// Renames an unreadable file to `<name>.broken` so the next start does not trip on it.
    fn set_aside(&self, path: &Path, err: &SnapError) {
        let mut broken = path.as_os_str().to_owned();
        broken.push(".broken");
        let broken = PathBuf::from(broken);
        match std::fs::rename(path, &broken) {
            Ok(()) => tracing::warn!(
                path = %path.display(), broken = %broken.display(), error = %err,
                "unreadable snapshot file renamed; trying an older one"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(), error = %err, rename_error = %e,
                "unreadable snapshot file could not be renamed; trying an older one"
            ),
        }
    }
}
