//! The pipeline (etcd `pipeline.go`): one `POST /raft` per message, the body being
//! the bare protobuf. Used while no stream to the peer is attached. Four workers
//! share a 64-slot queue, so up to four posts are in flight and messages may be
//! reordered, which raft tolerates.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use protobuf::Message as _;
use raft::SnapshotStatus;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::peer_status::PeerStatus;
use super::urlpick::UrlPicker;
use super::util::{TransportError, full_body, post, raft_request};

/// Queue slots: with 4 workers and ~1 ms per post on a LAN this is the network
/// being out of work for less than a second (etcd `pipelineBufSize`).
pub const PIPELINE_BUF_SIZE: usize = 64;
/// Posts in flight per peer (etcd `connPerPipeline`).
const CONN_PER_PIPELINE: usize = 4;
/// A post not answered within this long counts as failed. etcd has no limit; one
/// keeps a stalled peer from holding the workers forever.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

/// The peer's handle on the pipeline workers.
pub struct Pipeline {
    queue: mpsc::Sender<Message>,
}

/// What a worker needs to post to a peer.
pub struct PipelineCtx {
    pub shared: Arc<Shared>,
    pub peer: u64,
    pub picker: Arc<UrlPicker>,
    pub status: Arc<PeerStatus>,
}

impl Pipeline {
    pub fn start(ctx: PipelineCtx, stop: CancellationToken) -> Pipeline {
        let (queue, rx) = mpsc::channel(PIPELINE_BUF_SIZE);
        let rx = Arc::new(Mutex::new(rx));
        let ctx = Arc::new(ctx);
        for _ in 0..CONN_PER_PIPELINE {
            ctx.shared
                .rt
                .spawn(worker(ctx.clone(), rx.clone(), stop.clone()));
        }
        Pipeline { queue }
    }

    /// Messages waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Queues `m` without waiting; gives it back if the queue is full or closed.
    // The message is handed back by value so the caller can report it; boxing it
    // would cost an allocation per message on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, m: Message) -> Result<(), Message> {
        self.queue.try_send(m).map_err(|e| match e {
            mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
        })
    }
}

async fn worker(
    ctx: Arc<PipelineCtx>,
    rx: Arc<Mutex<mpsc::Receiver<Message>>>,
    stop: CancellationToken,
) {
    loop {
        let next = async { rx.lock().await.recv().await };
        let m = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            m = next => match m {
                Some(m) => m,
                None => return,
            },
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            () = ctx.post_one(m) => {}
        }
    }
}

impl PipelineCtx {
    async fn post_one(&self, m: Message) {
        let (to, is_snap) = (m.to, m.msg_type == MessageType::MsgSnapshot);
        let url = self.picker.pick();
        match self.post(&url, &m).await {
            Ok(()) => {
                self.status.activate();
                if is_snap {
                    self.shared.raft.report_snapshot(to, SnapshotStatus::Finish);
                }
            }
            Err(e) => {
                self.shared.check_removed(&e);
                tracing::debug!(peer = %format_args!("{:x}", self.peer), error = %e, "pipeline post failed");
                self.picker.unreachable(&url);
                self.status.deactivate("pipeline", &e);
                self.shared.raft.report_unreachable(to);
                if is_snap {
                    self.shared
                        .raft
                        .report_snapshot(to, SnapshotStatus::Failure);
                }
            }
        }
    }

    async fn post(&self, url: &str, m: &Message) -> Result<(), TransportError> {
        if url.is_empty() {
            return Err(TransportError::NoUrl);
        }
        let s = &self.shared;
        let body = m
            .write_to_bytes()
            .map_err(super::msg_codec::CodecError::from)?;
        let req = raft_request(Method::POST, url, "/raft", &s.id_hex, &s.cluster_hex)?
            .header("content-type", "application/protobuf")
            .body(full_body(body))?;
        post(&s.client, req, POST_TIMEOUT).await
    }
}
