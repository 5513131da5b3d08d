//! The raftNode: a raft-rs `RawNode` driven by one loop, with a WAL, a snapshotter and the
//! rafthttp transport around it (etcd `contrib/raftexample/raft.go`).
//!
//! # Contract (as `newRaftNode` in Go)
//!
//! [`start`] takes the two input channels, *proposeC* (serialized key-value pairs) and
//! *confChangeC* (membership changes), and returns *commitC* and *errorC*:
//!
//! - On start the node replays its snapshot and WAL. If a snapshot was loaded it is sent first
//!   as [`Commit::Snapshot`]; then every committed entry after it, and from then on new commits,
//!   arrive as [`Commit::Entries`] in log order.
//! - To shut the node down, drop every proposer (the Rust form of "close proposeC") or call
//!   [`RaftNodeHandle::stop`]; then await `error_rx`. It resolves to `Ok(())` after a clean stop
//!   (including this node being removed from the cluster) and to `Err` if the node failed, e.g.
//!   on a WAL write error. Either way `commit_rx` is closed afterwards.
//!
//! # Threads
//!
//! The loop runs on its own OS thread (`raft-node-<id>`) with a small current-thread tokio
//! runtime, so that it can `select!` over tokio channels while the blocking WAL `fsync` never
//! stalls a worker of the runtime that serves HTTP. Everything else reaches `RawNode` only
//! through messages into that loop: `RawNode` is not thread-safe and needs no lock this way.

mod apply;
pub mod guard;
#[cfg(test)]
mod guard_props;
mod logger;
mod node;
mod proposals;
mod read_index;
mod replay;
pub mod storage;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use raft::SnapshotStatus;
use raft::eraftpb::{ConfChange, Message};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::kvstore::ReadIndexRequest;
use crate::ops::{self, NodeStatus};
use crate::rafthttp::{self, ProcessError, Transport, TransportConfig};
use crate::snap::SnapError;
use crate::wal::WalError;

pub use apply::{entries_to_apply, process_messages};
pub use guard::PayloadChecks;
pub use proposals::fresh_origin as random_u64;

/// raftexample's cluster id, sent in `X-Etcd-Cluster-ID` (as hex: `1000`).
pub const CLUSTER_ID: u64 = 0x1000;

/// The cluster id for `--cluster-token`: a stable hash of the token, never 0 or [`CLUSTER_ID`].
pub fn cluster_id_for(token: &str) -> u64 {
    // Two CRC-32Cs (of the token, and of it salted) make 64 bits that every build agrees on.
    let lo = u64::from(crc32c::crc32c(token.as_bytes()));
    let hi = u64::from(crc32c::crc32c_append(0x5241_4654, token.as_bytes())); // "RAFT"
    ((hi << 32) | lo).max(CLUSTER_ID + 1)
}

/// Take a snapshot once this many entries were applied since the last one (Go: `defaultSnapshotCount`).
pub const DEFAULT_SNAPSHOT_COUNT: u64 = 10_000;
/// Entries kept in memory after a snapshot so slow followers catch up from the log rather than
/// by a whole snapshot (Go: `snapshotCatchUpEntriesN`).
pub const DEFAULT_SNAPSHOT_CATCHUP_ENTRIES: u64 = 10_000;

/// Everything the raft node needs to know; [`Config::new`] gives the Go original's defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id, 1-based position in `peers` (or a new id when joining).
    pub id: u64,
    /// Raft URLs of the initial cluster; node `i` is `peers[i - 1]`.
    pub peers: Vec<String>,
    /// Join an existing cluster instead of bootstrapping a new one.
    pub join: bool,
    /// Where `raftexample-<id>` (WAL) and `raftexample-<id>-snap` live.
    pub data_dir: PathBuf,
    /// See [`DEFAULT_SNAPSHOT_COUNT`].
    pub snapshot_count: u64,
    /// See [`DEFAULT_SNAPSHOT_CATCHUP_ENTRIES`].
    pub snapshot_catchup_entries: u64,
    /// One raft tick; the election timeout is 10 ticks, the heartbeat 1 tick.
    pub tick_interval: Duration,
    /// Connection cap and header timeout of the raft port's server.
    pub raft_server_limits: crate::http_server::Limits,
    /// Sent and required in `X-Etcd-Cluster-ID`: [`CLUSTER_ID`], or [`cluster_id_for`] a token.
    pub cluster_id: u64,
    /// How to recognise the application's proposals and snapshots, so that the raft port
    /// refuses ones it could never apply (see [`guard`]). Accepts anything by default.
    pub payload_checks: PayloadChecks,
}

impl Config {
    /// The Go original's settings for node `id` of `peers`, with data in the working directory.
    pub fn new(id: u64, peers: Vec<String>) -> Config {
        Config {
            id,
            peers,
            join: false,
            data_dir: PathBuf::from("."),
            snapshot_count: DEFAULT_SNAPSHOT_COUNT,
            snapshot_catchup_entries: DEFAULT_SNAPSHOT_CATCHUP_ENTRIES,
            tick_interval: Duration::from_millis(100),
            raft_server_limits: crate::http_server::Limits::default(),
            cluster_id: CLUSTER_ID,
            payload_checks: PayloadChecks::default(),
        }
    }

    /// The WAL directory, `raftexample-<id>`.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir.join(format!("raftexample-{}", self.id))
    }

    /// The snapshot directory, `raftexample-<id>-snap`.
    pub fn snap_dir(&self) -> PathBuf {
        self.data_dir.join(format!("raftexample-{}-snap", self.id))
    }

    fn validate(&self) -> Result<(), NodeError> {
        if self.id == 0 {
            return Err(NodeError::Config("--id must be at least 1".into()));
        }
        if !self.join && self.id as usize > self.peers.len() {
            return Err(NodeError::Config(format!(
                "--id {} but --cluster lists only {} peer(s): node i is the i-th URL of --cluster",
                self.id,
                self.peers.len()
            )));
        }
        if self.snapshot_count == 0 {
            return Err(NodeError::Config(
                "--snapshot-count must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// What the raft node publishes to the key-value store, in log order (Go: `*commit`, where a
/// `nil` commit meant "load the snapshot").
#[derive(Debug)]
pub enum Commit {
    /// Payloads of committed normal entries. The store sends on `apply_done` once they are
    /// applied; the node waits for it before taking a snapshot, so a snapshot never misses an
    /// entry it claims to contain (etcd#12714).
    Entries {
        /// The proposals, as given to *proposeC* (may be empty when only no-ops or conf
        /// changes committed: the index still moves).
        data: Vec<Bytes>,
        /// Raft index of the last entry of the batch: the store's applied index once applied.
        index: u64,
        /// Signalled (or dropped) once `data` is applied.
        apply_done: oneshot::Sender<()>,
    },
    /// Replace the whole state with this snapshot (the store's own serialization).
    Snapshot {
        /// The store's serialization, from its `get_snapshot`.
        data: Bytes,
        /// Raft index the snapshot covers.
        index: u64,
    },
}

/// Serializes the key-value store for a snapshot, appending it to the buffer (Go's
/// `getSnapshot`). Called on the snapshot writer thread once every published entry is applied;
/// the node publishes no further commits until it returns, so the store is exactly at the
/// snapshot's index meanwhile, while the Ready loop goes on. Appending, rather than returning
/// a new buffer, lets the whole snapshot payload be written in one pass into one buffer sized
/// from the last snapshot: no second copy of megabytes of map, and no reallocations.
pub type GetSnapshot = Arc<dyn Fn(&mut Vec<u8>) + Send + Sync>;

/// Why the raft node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The flags do not describe a valid node.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Reading or writing the write-ahead log failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// Reading or writing a snapshot file failed.
    #[error(transparent)]
    Snap(#[from] SnapError),
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What the node was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A committed entry was not written by this program.
    #[error("raft log entry {index} is unreadable: {reason}")]
    BadEntry {
        /// Raft index of the entry.
        index: u64,
        /// What was wrong.
        reason: String,
    },
    /// A part the node depends on stopped (the key-value store, a helper thread), so it cannot
    /// go on; the log above says why that part stopped.
    #[error("the raft node cannot continue: {0}")]
    Halted(String),
    /// The raft loop panicked (a bug, or raft-rs refusing an impossible state).
    #[error("the raft loop panicked: {0}")]
    Panicked(String),
    /// A snapshot's payload could not be decoded.
    #[error("snapshot at index {index} is unreadable: {reason}")]
    BadSnapshot {
        /// Raft index of the snapshot.
        index: u64,
        /// What was wrong.
        reason: String,
    },
}

/// What [`start`] hands back: the output channels and a way to stop the node.
pub struct RaftNodeHandle {
    /// *commitC*: committed entries and snapshots for the key-value store.
    pub commit_rx: mpsc::Receiver<Commit>,
    /// *errorC*: resolves when the node has stopped (see the module docs).
    pub error_rx: oneshot::Receiver<Result<(), NodeError>>,
    /// The raft transport, for callers that want peer information.
    pub transport: Transport,
    /// The node's state after its latest turn (also served on `/status`).
    pub status: watch::Receiver<NodeStatus>,
    /// Cancel to stop the node (see [`RaftNodeHandle::stop`]).
    pub stop: CancellationToken,
}

impl RaftNodeHandle {
    /// Asks the node to stop; await `error_rx` to know it has. A leader first hands its
    /// leadership to the most up-to-date follower, so the cluster does not wait an election
    /// timeout for a new leader.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Inputs of the raft loop that come from the transport (etcd's `rafthttp.Raft` callbacks).
enum Report {
    Unreachable(u64),
    Snapshot(u64, SnapshotStatus),
}

/// The transport's view of the node: every call becomes a message into the raft loop.
struct NodeHandle {
    /// Messages from peers. Bounded: a slow loop pushes back on the senders instead of
    /// buffering without limit.
    mailbox: mpsc::Sender<Message>,
    /// Reports are tiny and must not be lost (a lost snapshot report stalls a follower).
    reports: mpsc::UnboundedSender<Report>,
    /// Ids removed from the cluster; shared with the loop, which is the only writer.
    removed: Arc<RwLock<HashSet<u64>>>,
    /// This node's id and the application's payload checks, for [`guard::check_message`].
    id: u64,
    checks: PayloadChecks,
}

/// Records a message the guard refused, and the transport's answer to it.
fn refuse(m: &Message, reason: String) -> ProcessError {
    guard::refused(m, &reason);
    ProcessError::Invalid(reason)
}

impl rafthttp::Raft for NodeHandle {
    fn check(&self, m: &Message) -> Result<(), ProcessError> {
        guard::check_message(m, self.id, &self.checks).map_err(|reason| refuse(m, reason))
    }

    fn process(&self, m: Message) -> futures::future::BoxFuture<'static, Result<(), ProcessError>> {
        if let Err(e) = self.check(&m) {
            return Box::pin(async { Err(e) });
        }
        let removed = self.is_id_removed(m.from);
        let mailbox = self.mailbox.clone();
        let checks = self.checks;
        Box::pin(async move {
            if removed {
                return Err(ProcessError::MemberRemoved);
            }
            let m = if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                // Reads the whole payload: off the runtime's workers.
                let (m, checked) = tokio::task::spawn_blocking(move || {
                    let checked = guard::check_snapshot(&m.get_snapshot().data, &checks);
                    (m, checked)
                })
                .await
                .map_err(|_| ProcessError::Stopped)?;
                checked.map_err(|reason| refuse(&m, reason))?;
                m
            } else {
                m
            };
            mailbox.send(m).await.map_err(|_| ProcessError::Stopped)
        })
    }

    fn is_id_removed(&self, id: u64) -> bool {
        self.removed
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&id)
    }

    fn report_unreachable(&self, id: u64) {
        // If the loop is gone nobody needs the report.
        let _ = self.reports.send(Report::Unreachable(id));
    }

    fn report_snapshot(&self, id: u64, status: SnapshotStatus) {
        let _ = self.reports.send(Report::Snapshot(id, status));
    }
}

/// The node's input channels: *proposeC*, *confChangeC* and *readIndexC*.
pub struct NodeInputs {
    /// Serialized key-value pairs to propose. Dropping every sender stops the node.
    pub propose_rx: mpsc::Receiver<Vec<u8>>,
    /// Membership changes to propose.
    pub conf_change_rx: mpsc::Receiver<ConfChange>,
    /// ReadIndex requests for linearizable reads.
    pub read_index_rx: mpsc::Receiver<ReadIndexRequest>,
}

/// Starts the raft node: replays its snapshot and WAL (or bootstraps a new cluster), serves the
/// raft transport (and `/health`, `/status`, `/metrics`) on `raft_listener`, and runs the Ready
/// loop on its own thread.
///
/// Must be called inside the tokio runtime that serves HTTP (the transport's tasks run there).
///
/// # Errors
///
/// Returns the error if the configuration is invalid or the stored state cannot be read (a
/// corrupt WAL or snapshot): the node refuses to start rather than lose data.
pub async fn start(
    cfg: Config,
    raft_listener: tokio::net::TcpListener,
    inputs: NodeInputs,
    get_snapshot: GetSnapshot,
) -> Result<RaftNodeHandle, NodeError> {
    cfg.validate()?;
    let (mailbox_tx, mailbox_rx) = mpsc::channel(4096);
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    let removed = Arc::new(RwLock::new(HashSet::new()));
    let handle = Arc::new(NodeHandle {
        mailbox: mailbox_tx,
        reports: report_tx,
        removed: removed.clone(),
        id: cfg.id,
        checks: cfg.payload_checks,
    });
    let transport = Transport::new(
        TransportConfig {
            id: cfg.id,
            cluster_id: cfg.cluster_id,
        },
        handle,
    );
    for (i, url) in cfg.peers.iter().enumerate() {
        let id = i as u64 + 1;
        if id != cfg.id {
            transport.add_peer(id, std::slice::from_ref(url));
        }
    }

    let stop = CancellationToken::new();
    // Stops the raft listener once the loop has finished (a leader still talks to its peers
    // while it hands over leadership).
    let server_stop = CancellationToken::new();
    let (status_tx, status_rx) = watch::channel(NodeStatus::default());
    let server = rafthttp::serve(
        raft_listener,
        transport
            .handler()
            .merge(ops::router(status_rx.clone(), transport.clone())),
        cfg.raft_server_limits,
        server_stop.clone().cancelled_owned(),
    );
    let id = cfg.id;
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(node = id, "raft transport server failed: {e}");
        }
    });

    let (commit_tx, commit_rx) = mpsc::channel(64);
    let (error_tx, error_rx) = oneshot::channel();
    let (init_tx, init_rx) = oneshot::channel();
    let loop_stop = stop.clone();
    let loop_server_stop = server_stop.clone();
    let loop_transport = transport.clone();
    std::thread::Builder::new()
        .name(format!("raft-node-{id}"))
        .spawn(move || {
            let span = tracing::info_span!("node", id);
            let _enter = span.enter();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(source) => {
                    let _ = init_tx.send(Err(NodeError::Io {
                        context: "creating the raft loop's runtime".into(),
                        source,
                    }));
                    return;
                }
            };
            let inputs = node::Inputs {
                propose_rx: inputs.propose_rx,
                conf_change_rx: inputs.conf_change_rx,
                read_index_rx: inputs.read_index_rx,
                mailbox_rx,
                report_rx,
                stop: loop_stop.clone(),
            };
            let node_transport = loop_transport.clone();
            // A panic (a raft-rs invariant, a bug) must still stop the transport and reach
            // errorC as an error, so the process exits non-zero and a supervisor restarts it.
            let run = std::panic::AssertUnwindSafe(|| {
                rt.block_on(async move {
                    let node = match node::RaftNode::new(
                        cfg,
                        node_transport,
                        commit_tx,
                        get_snapshot,
                        removed,
                        status_tx,
                    )
                    .await
                    {
                        Ok(node) => {
                            let _ = init_tx.send(Ok(()));
                            node
                        }
                        Err(e) => {
                            let _ = init_tx.send(Err(e));
                            return None;
                        }
                    };
                    Some(node.serve_channels(inputs).await)
                })
            });
            let result = std::panic::catch_unwind(run).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Some(Err(NodeError::Panicked(what)))
            });
            // Whatever the reason, the transport and its server stop with the loop.
            loop_transport.stop();
            loop_stop.cancel();
            loop_server_stop.cancel();
            if let Some(result) = result {
                if let Err(e) = &result {
                    tracing::error!("raft node stopped: {e}");
                }
                let _ = error_tx.send(result);
            }
        })
        .map_err(|source| NodeError::Io {
            context: "spawning the raft loop thread".into(),
            source,
        })?;

    match init_rx.await {
        Ok(Ok(())) => Ok(RaftNodeHandle {
            commit_rx,
            error_rx,
            transport,
            status: status_rx,
            stop,
        }),
        Ok(Err(e)) => {
            server_stop.cancel();
            Err(e)
        }
        Err(_) => {
            server_stop.cancel();
            Err(NodeError::Halted(
                "the raft loop exited during start".into(),
            ))
        }
    }
}
