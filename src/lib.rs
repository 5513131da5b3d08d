//! raftexample: a replicated key-value store on raft, a Rust port of etcd's
//! `contrib/raftexample`.
//!
//! # The components and the channels between them
//!
//! ```text
//!   curl ──HTTP──▶ httpapi ──propose()──▶ kvstore ──proposeC──────┐
//!                     │                      ▲                      ▼
//!                     └───────────confChangeC────────────────▶ raft_node ◀──▶ rafthttp ◀──▶ peers
//!                                            │                  │    │
//!                                            └─────commitC──────┘    ├──▶ wal  (raftexample-<id>/)
//!                                                                     └──▶ snap (raftexample-<id>-snap/)
//! ```
//!
//! `main.rs` creates *proposeC* and *confChangeC*, starts the [`raft_node`], hands its
//! *commitC* to the [`kvstore`], and serves the [`httpapi`].
//!
//! # Follow one PUT
//!
//! 1. [`httpapi`]: `PUT /my-key` with body `hello` calls [`kvstore::KvStore::propose`], which
//!    serializes `("/my-key", "hello")` into *proposeC*, and answers 204.
//! 2. [`raft_node`]: the Ready loop takes every waiting proposal and steps them into raft as one
//!    `MsgPropose`. The next `Ready` carries the new entry: the leader sends it to the followers
//!    through [`rafthttp`], writes it to the [`wal`] with one fsync, and appends it to the
//!    in-memory log. On each follower, [`raft_node::guard`] checks the append before raft sees
//!    it (the raft port is open to anyone who knows the cluster id).
//! 3. Once a quorum has it, the entry comes back in a `Ready`'s committed entries; the loop
//!    publishes it on *commitC*.
//! 4. [`kvstore`]: `read_commits` decodes it and sets `my-key = hello` in the map, where the
//!    next `GET /my-key` finds it.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod fileutil;
pub mod http_server;
pub mod httpapi;
pub mod kvstore;
pub mod metrics;
pub mod ops;
pub mod raft_node;
pub mod rafthttp;
pub mod snap;
pub mod wal;
