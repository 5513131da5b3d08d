//! TEMPORARY stand-in for the snapshotter (replaced by the real one on merge).
#![allow(missing_docs)]
use crate::wal::WalSnapshot;
use raft::eraftpb::Snapshot;
use std::path::{Path, PathBuf};
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("snap: no available snapshot")]
    NoSnapshot,
}
pub struct Snapshotter {
    dir: PathBuf,
}
impl Snapshotter {
    pub fn new(dir: impl Into<PathBuf>) -> Snapshotter {
        Snapshotter { dir: dir.into() }
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn save_snap(&self, _s: &Snapshot) -> Result<(), SnapError> {
        Ok(())
    }
    pub fn load(&self) -> Result<Snapshot, SnapError> {
        Err(SnapError::NoSnapshot)
    }
    pub fn load_newest_available(&self, _w: &[WalSnapshot]) -> Result<Snapshot, SnapError> {
        Err(SnapError::NoSnapshot)
    }
}
