//! raftexample: a Rust port of etcd's `contrib/raftexample`.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
pub mod fileutil;
pub mod snap;
pub mod wal;
