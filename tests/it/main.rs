//! Integration tests: one binary.

/// On-disk compatibility with etcd's Go `wal` and `snap` packages (fixtures in tests/data/).
mod wal_interop;
/// SIGKILL during a write loop: every acknowledged entry survives (re-executes this binary).
mod wal_recovery;
