//! TEMPORARY in-memory stand-in for the WAL (replaced by the real one on merge).
#![allow(missing_docs, clippy::new_without_default)]
use raft::eraftpb::{ConfState, Entry, HardState};
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WalSnapshot {
    pub index: u64,
    pub term: u64,
    pub conf_state: Option<ConfState>,
}
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
pub struct WalOptions {
    pub segment_size: u64,
}
impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 64_000_000,
        }
    }
}
pub struct Wal;
impl Wal {
    pub fn exist(dir: &Path) -> bool {
        dir.exists()
    }
    pub fn create(dir: &Path, _m: &[u8]) -> Result<Wal, WalError> {
        std::fs::create_dir_all(dir)?;
        Ok(Wal)
    }
    pub fn open(_dir: &Path, _s: &WalSnapshot) -> Result<Wal, WalError> {
        Ok(Wal)
    }
    pub fn read_all(&mut self) -> Result<(Vec<u8>, HardState, Vec<Entry>), WalError> {
        Ok((vec![], HardState::default(), vec![]))
    }
    pub fn save(&mut self, _hs: &HardState, _e: &[Entry]) -> Result<(), WalError> {
        Ok(())
    }
    pub fn save_snapshot(&mut self, _s: &WalSnapshot) -> Result<(), WalError> {
        Ok(())
    }
    pub fn sync(&mut self) -> Result<(), WalError> {
        Ok(())
    }
    pub fn release_lock_to(&mut self, _i: u64) -> Result<(), WalError> {
        Ok(())
    }
    pub fn size_on_disk(&self) -> u64 {
        0
    }
    pub fn close(self) -> Result<(), WalError> {
        Ok(())
    }
}
pub fn valid_snapshot_entries(_dir: &Path) -> Result<Vec<WalSnapshot>, WalError> {
    Ok(vec![])
}
