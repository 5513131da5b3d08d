//! Integration tests: one binary.
mod rafthttp; // the raft transport between real transports on loopback
