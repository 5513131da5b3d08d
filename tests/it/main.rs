//! Integration tests, in one binary (each extra test crate would relink tokio, axum, raft...).

/// Shared helpers: polling with a deadline, an HTTP client, in-process and process clusters.
mod support;

/// The benchmark tool against a fake in-process cluster.
mod bench;
/// Adding and removing nodes.
mod membership;
/// Linearizable requests, operations endpoints, graceful shutdown, flags.
mod operations;
/// The README flows on real `raftexample` processes.
mod process_cluster;
/// Ports of the Go raftexample tests, on in-process clusters wired by their channels.
mod raftexample;
/// The raft transport between real transports on loopback.
mod rafthttp;
/// Snapshots and log compaction.
mod snapshot;
/// On-disk compatibility with etcd's Go `wal` and `snap` packages (fixtures in tests/data/).
mod wal_interop;
/// SIGKILL during a write loop: every acknowledged entry survives (re-executes this binary).
mod wal_recovery;
