//! The raft transport: etcd v3.4's `rafthttp`, wire-compatible with it.
//!
//! Every member serves [`Transport::handler`] on its raft URL and keeps, for each
//! peer, three ways to send it messages:
//!
//! - **Streams** (`GET /raft/stream/{msgapp,message}/<from>`): long-lived HTTP
//!   responses carrying a sequence of frames. They run the "wrong" way round: node A
//!   *dials* `GET {B}/raft/stream/{type}/{A}` and B writes its **B→A** traffic into
//!   that open response. So each member dials two streams to each peer (its
//!   *readers*) and answers two from each peer (its *writers*): four connections per
//!   pair. `message` carries any message ([`msg_codec`]); `msgapp` carries only
//!   `MsgAppend`, compressed ([`msgappv2_codec`]). Idle streams carry a link
//!   heartbeat every 5 s / 3 because readers give up after 5 s of silence.
//! - **Pipeline** (`POST /raft`, one protobuf per request, 4 workers per peer): the
//!   fallback while no stream is attached (a peer that just started, or one that is
//!   unreachable), and the path a stream cannot serve.
//! - **Snapshot** (`POST /raft/snapshot`, its own connection): a `MsgSnapshot` and
//!   its data, so a big snapshot never delays the messages behind it. etcd's
//!   raftexample sent `MsgSnap` over the pipeline; this port uses the snapshot path
//!   (etcd's "merged snapshot" body) so the receiver can preallocate the data.
//!
//! `peer::Peer::pick` chooses per message: `MsgSnapshot` → snapshot path;
//! `MsgAppend` → msgapp stream if attached; anything → message stream if attached;
//! otherwise the pipeline. Every queue is bounded (stream 4096, pipeline 64); when
//! one is full the message is dropped and raft is told the peer is unreachable (and
//! for a snapshot, that it failed). Raft retries on its own, so [`Transport::send`]
//! never blocks the raft loop.
//!
//! Received messages go to [`Raft::process`], which resolves once the node's loop
//! has queued them: a busy node slows its readers (TCP backpressure) instead of
//! losing proposals.
//!
//! Besides, each peer is probed on `GET /raft/probing` every few seconds; the round
//! trip time shows in [`Transport::peer_status`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use raft::SnapshotStatus;
use raft::eraftpb::Message;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod http;
pub mod msg_codec;
pub mod msgappv2_codec;
mod pb_bounds;
mod peer;
mod peer_status;
mod pipeline;
mod probing;
mod snapshot;
mod stream_reader;
mod stream_writer;
mod urlpick;
pub mod util;

#[cfg(test)]
mod codec_test_util;

pub use http::serve;
pub use peer_status::PeerStatusReport;
pub use util::TransportError;

use peer::Peer;

/// What the transport calls back into. Implemented by the raft node's handle
/// (messages into its loop: the loop alone owns the `RawNode`).
///
/// The `report_*` methods are called from the transport's tasks and, when a queue
/// is full, from inside [`Transport::send`] on the caller's thread: they must not
/// block (queue the report, e.g. with an unbounded or `try_send` channel).
pub trait Raft: Send + Sync + 'static {
    /// Hands a received message to the node; resolves once the node's loop accepted
    /// it (bounded queue = backpressure).
    fn process(&self, m: Message) -> futures::future::BoxFuture<'static, Result<(), ProcessError>>;
    /// Whether `m` would be refused by [`Raft::process`] for its shape alone; lets the
    /// snapshot handler refuse before it reads the data.
    fn check(&self, _m: &Message) -> Result<(), ProcessError> {
        Ok(())
    }
    /// Whether `id` was removed from the cluster (its streams get 410, posts 403).
    fn is_id_removed(&self, id: u64) -> bool;
    /// A message to `id` was lost; raft should slow down and probe.
    fn report_unreachable(&self, id: u64);
    /// How sending a snapshot to `id` ended.
    fn report_snapshot(&self, id: u64, status: SnapshotStatus);
}

/// Why [`Raft::process`] refused a message.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The sender was removed from the cluster (answered 403).
    #[error("member removed")]
    MemberRemoved,
    /// The raft node has stopped.
    #[error("raft node stopped")]
    Stopped,
    /// The message is not one a correct peer sends (answered 400 with the reason).
    #[error("invalid raft message: {0}")]
    Invalid(String),
}

/// Who this transport is.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// This member's id.
    pub id: u64,
    /// The cluster id every request must carry (raftexample: `0x1000`).
    pub cluster_id: u64,
}

/// The sending and receiving half of raft's network. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    peers: RwLock<HashMap<u64, Arc<Peer>>>,
    /// Cancelled by [`Transport::stop`]; every peer's token is a child of it.
    stop: CancellationToken,
}

impl Drop for Inner {
    /// The last handle gone (including the router's): end the peers' tasks too,
    /// which hold only the `Shared` part and would otherwise run on.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What every task of the transport needs.
pub(crate) struct Shared {
    pub id: u64,
    pub id_hex: String,
    pub cluster_hex: String,
    pub raft: Arc<dyn Raft>,
    pub client: util::HttpClient,
    /// The runtime everything is spawned on: `send` and `add_peer` are called from
    /// the raft node's own thread, which is not a worker of this runtime.
    pub rt: Handle,
    /// Set once a peer says this member was removed (410 on a stream dial, 403 on
    /// a post): etcd's `errMemberRemoved` on `ErrorC`, on which raftexample stops.
    pub removed: watch::Sender<bool>,
}

impl Shared {
    /// Looks at a send failure for the one error the node must act on.
    pub(crate) fn check_removed(&self, e: &TransportError) {
        if matches!(e, TransportError::MemberRemoved) && !self.removed.send_replace(true) {
            tracing::error!(id = %self.id_hex, "a peer says this member was removed from the cluster");
        }
    }
}

impl Transport {
    /// Creates a transport with no peers.
    ///
    /// # Panics
    /// Outside a tokio runtime: it captures `Handle::current()` and spawns all of
    /// its tasks there, whichever thread later calls `send` or `add_peer`.
    pub fn new(cfg: TransportConfig, raft: Arc<dyn Raft>) -> Transport {
        let shared = Shared {
            id: cfg.id,
            id_hex: util::id_to_hex(cfg.id),
            cluster_hex: util::id_to_hex(cfg.cluster_id),
            raft,
            client: util::new_client(),
            rt: Handle::current(),
            removed: watch::Sender::new(false),
        };
        let inner = Inner {
            shared: Arc::new(shared),
            peers: RwLock::new(HashMap::new()),
            stop: CancellationToken::new(),
        };
        Transport {
            inner: Arc::new(inner),
        }
    }

    /// The router to serve on this member's raft URL: `POST /raft`,
    /// `GET /raft/stream/{msgapp,message}/<from>`, `POST /raft/snapshot`,
    /// `GET /raft/probing`. It has no fallback, so more routes can be merged in.
    pub fn handler(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Queues messages for their peers. Never blocks: messages to 0, to unknown
    /// peers, and those that find their queue full are dropped (the latter reported
    /// to raft as unreachable).
    pub fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            if m.to == 0 {
                continue;
            }
            // The lock is not held while sending: a full queue calls back into
            // raft (`report_unreachable`), which must be free to use the transport.
            match self.peer(m.to) {
                Some(p) => p.send(m),
                None => {
                    tracing::debug!(to = %format_args!("{:x}", m.to), "ignored message to unknown peer")
                }
            }
        }
    }

    /// Starts talking to `id` at `urls`: two stream readers, two stream writers, the
    /// pipeline and a prober. Does nothing if the peer exists or the transport stopped.
    pub fn add_peer(&self, id: u64, urls: &[String]) {
        let mut peers = self.peers_write();
        if self.inner.stop.is_cancelled() || peers.contains_key(&id) {
            return;
        }
        let token = self.inner.stop.child_token();
        peers.insert(
            id,
            Arc::new(Peer::start(self.inner.shared.clone(), id, urls, token)),
        );
        tracing::info!(peer = %format_args!("{id:x}"), ?urls, "added peer");
    }

    /// Stops everything for `id`; its open streams end.
    pub fn remove_peer(&self, id: u64) {
        if let Some(p) = self.peers_write().remove(&id) {
            p.stop();
            tracing::info!(peer = %format_args!("{id:x}"), "removed peer");
        }
    }

    /// Replaces the URLs used to reach `id`.
    pub fn update_peer(&self, id: u64, urls: &[String]) {
        if let Some(p) = self.peers_read().get(&id) {
            p.update(urls);
            tracing::info!(peer = %format_args!("{id:x}"), ?urls, "updated peer");
        }
    }

    /// Since when `id` has been reachable, or `None` if it is not (or unknown).
    pub fn active_since(&self, id: u64) -> Option<SystemTime> {
        self.peers_read()
            .get(&id)
            .and_then(|p| p.status().active_since())
    }

    /// URL, activity and last probe round trip of `id`, if it is a peer.
    pub fn peer_status(&self, id: u64) -> Option<PeerStatusReport> {
        self.peers_read().get(&id).map(|p| p.report())
    }

    /// Becomes `true` when a peer reports that this member was removed from the
    /// cluster; the node should then stop (raftexample: "I've been removed from
    /// the cluster! Shutting down.").
    pub fn member_removed(&self) -> watch::Receiver<bool> {
        self.inner.shared.removed.subscribe()
    }

    /// Ids of all peers.
    pub fn peer_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.peers_read().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Stops every peer: streams end (so a graceful HTTP shutdown does not wait on
    /// a long-lived stream body), pipelines and probers stop, queued messages are
    /// dropped. Idempotent; afterwards `add_peer` does nothing.
    pub fn stop(&self) {
        self.inner.stop.cancel();
        let peers: Vec<Arc<Peer>> = self.peers_write().drain().map(|(_, p)| p).collect();
        for p in peers {
            p.stop();
        }
    }

    fn peers_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<Peer>>> {
        // The map is only ever inserted into or removed from whole: a panic while
        // holding the lock cannot leave it half-updated.
        self.inner.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn peers_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<Peer>>> {
        self.inner.peers.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn peer(&self, id: u64) -> Option<Arc<Peer>> {
        self.peers_read().get(&id).cloned()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }
}
