//! Preallocating the next segment in the background (etcd `wal/file_pipeline.go`).
//!
//! Allocating 64 MB can take a while; doing it when a segment fills up would stall every
//! proposal behind it. A background thread therefore keeps one locked, preallocated file ready,
//! named `0.tmp` or `1.tmp` (alternating), and [`FilePipeline::open`] hands it over; `cut`
//! writes the segment header into it and renames it to its final name. `*.tmp` files in the WAL
//! directory are ignored when reading, so a crash at any point leaves no half-made segment.
//!
//! The hand-over is a rendezvous channel (capacity 0): the thread blocks in `send` until the
//! file is taken, so at most one file is allocated ahead. Dropping the pipeline drops the
//! receiver; the blocked `send` fails and the thread deletes its unused file and exits.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use super::error::WalError;
use crate::fileutil::{self, LockError};

type Allocated = io::Result<(PathBuf, File)>;

/// Hands out preallocated, locked files for new segments.
pub struct FilePipeline {
    dir: PathBuf,
    rx: Option<Receiver<Allocated>>,
    thread: Option<JoinHandle<()>>,
}

impl FilePipeline {
    /// Starts allocating files of `size` bytes in `dir`.
    pub fn new(dir: &Path, size: u64) -> Result<FilePipeline, WalError> {
        let (tx, rx) = sync_channel(0);
        let thread_dir = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("wal-file-pipeline".into())
            .spawn(move || run(&thread_dir, size, &tx))
            .map_err(WalError::io("start file pipeline thread for", dir))?;
        Ok(FilePipeline {
            dir: dir.to_path_buf(),
            rx: Some(rx),
            thread: Some(thread),
        })
    }

    /// Takes the next preallocated file (waits if it is still being allocated).
    pub fn open(&mut self) -> Result<(PathBuf, File), WalError> {
        let dir = self.dir.clone();
        let gone = || WalError::Io {
            op: "take a preallocated segment in",
            path: dir.clone(),
            source: io::Error::other("the file pipeline thread stopped after an earlier error"),
        };
        let Some(rx) = &self.rx else {
            return Err(gone());
        };
        match rx.recv() {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(WalError::Io {
                op: "preallocate a new segment in",
                path: self.dir.clone(),
                source: e,
            }),
            Err(_) => Err(gone()),
        }
    }
}

impl Drop for FilePipeline {
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!(dir = %self.dir.display(), "WAL file pipeline thread panicked");
        }
    }
}

fn run(dir: &Path, size: u64, tx: &SyncSender<Allocated>) {
    let mut count = 0u64;
    loop {
        let allocated = alloc(dir, count, size);
        count += 1;
        let failed = allocated.is_err();
        match tx.send(allocated) {
            Ok(()) if !failed => {}
            Ok(()) => return,
            Err(unused) => {
                if let Ok((path, file)) = unused.0 {
                    drop(file);
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "failed to remove unused preallocated WAL file");
                    }
                }
                return;
            }
        }
    }
}

fn alloc(dir: &Path, count: u64, size: u64) -> Allocated {
    let path = dir.join(format!("{}.tmp", count % 2));
    let file = fileutil::try_lock_file(&path, true).map_err(|e| match e {
        LockError::WouldBlock => io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is locked by another process", path.display()),
        ),
        LockError::Io(e) => e,
    })?;
    // A leftover from a crash may hold old bytes; a new segment must read as zeros.
    file.set_len(0)?;
    fileutil::preallocate(&file, size)?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_preallocated_files_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0.tmp"), b"stale").unwrap();
        let mut fp = FilePipeline::new(dir.path(), 8192).unwrap();
        let (p0, f0) = fp.open().unwrap();
        assert_eq!(p0, dir.path().join("0.tmp"));
        assert_eq!(f0.metadata().unwrap().len(), 8192);
        assert!(std::fs::read(&p0).unwrap().iter().all(|&b| b == 0));
        std::fs::rename(&p0, dir.path().join("seg0")).unwrap();
        let (p1, _f1) = fp.open().unwrap();
        assert_eq!(p1, dir.path().join("1.tmp"));
        std::fs::rename(&p1, dir.path().join("seg1")).unwrap();
        drop(fp);
        // The file allocated ahead (0.tmp again) was removed; handed-out ones stay.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["seg0", "seg1"]);
        drop(f0);
    }
}
