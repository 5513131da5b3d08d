//! Integration tests: one binary.

/// On-disk compatibility with etcd's Go `wal` and `snap` packages (fixtures in tests/data/).
mod wal_interop;
