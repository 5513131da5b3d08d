//! The writing end of a stream (etcd `streamWriter`, `stream.go:108-330`).
//!
//! A peer dials `GET /raft/stream/{type}/<its id>` on us; the handler answers 200
//! at once and hands the response body (an [`OutgoingConn`]) to the writer for that
//! peer and type. From then on the writer owns the body: it takes messages off its
//! queue, encodes as many as are waiting (up to 2048) into one buffer and sends that
//! as one chunk, so a burst costs one write. While the queue is idle it sends a link
//! heartbeat every [`HEARTBEAT_INTERVAL`] so the peer's 5 s read deadline never fires.
//!
//! A newer connection replaces the older one (the older response ends). When the
//! connection fails (the peer went away, or stopped reading for
//! [`WRITE_TIMEOUT`]), the writer detaches: queued messages are dropped, raft is
//! told the peer is unreachable, and `Peer::pick` falls back to the
//! pipeline until the peer dials again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::msg_codec::{Encoder, MessageEncoder};
use super::msgappv2_codec::MsgAppV2Encoder;
use super::peer_status::PeerStatus;
use super::util::link_heartbeat;

/// Messages a stream writer holds before `send` starts dropping (etcd `streamBufSize`).
pub const STREAM_BUF_SIZE: usize = 4096;
/// Flush after this many messages even if more are queued, so one huge burst does
/// not delay the first message (etcd flushes at `streamBufSize / 2`).
const MAX_BATCH: usize = STREAM_BUF_SIZE / 2;
/// etcd `ConnReadTimeout`: a stream silent this long is considered dead.
pub const CONN_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A write that cannot be handed to the connection within this long fails it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Link heartbeats go out three times per read timeout.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(5000 / 3);
/// Encoded chunks waiting for the HTTP connection. Small: the queue of messages
/// is the buffer, this only lets encoding overlap the socket write.
const BODY_CHUNKS: usize = 4;

/// The two stream types. The URL segment of msgappv2 is `msgapp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    MsgAppV2,
    Message,
}

impl StreamKind {
    pub fn from_segment(s: &str) -> Option<StreamKind> {
        match s {
            "msgapp" => Some(StreamKind::MsgAppV2),
            "message" => Some(StreamKind::Message),
            _ => None,
        }
    }

    pub fn segment(self) -> &'static str {
        match self {
            StreamKind::MsgAppV2 => "msgapp",
            StreamKind::Message => "message",
        }
    }

    fn encoder(self) -> Box<dyn Encoder> {
        match self {
            StreamKind::MsgAppV2 => Box::new(MsgAppV2Encoder::new()),
            StreamKind::Message => Box::new(MessageEncoder),
        }
    }
}

impl std::fmt::Display for StreamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamKind::MsgAppV2 => "stream MsgApp v2",
            StreamKind::Message => "stream Message",
        })
    }
}

/// An accepted stream response: chunks sent here become the response body, and
/// dropping the sender ends the response.
pub struct OutgoingConn {
    pub chunks: mpsc::Sender<Bytes>,
}

impl OutgoingConn {
    /// A connection and the receiving end its HTTP response body reads from.
    pub fn new() -> (OutgoingConn, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(BODY_CHUNKS);
        (OutgoingConn { chunks: tx }, rx)
    }
}

/// The peer's handle on a writer task.
pub struct StreamWriter {
    queue: mpsc::Sender<Message>,
    attached: Arc<AtomicBool>,
    conns: mpsc::Sender<OutgoingConn>,
}

impl StreamWriter {
    pub fn start(
        shared: Arc<Shared>,
        peer: u64,
        kind: StreamKind,
        status: Arc<PeerStatus>,
        stop: CancellationToken,
    ) -> StreamWriter {
        let (queue, queue_rx) = mpsc::channel(STREAM_BUF_SIZE);
        let (conns, conns_rx) = mpsc::channel(1);
        let attached = Arc::new(AtomicBool::new(false));
        let task = WriterTask {
            shared: shared.clone(),
            peer,
            kind,
            status,
            attached: attached.clone(),
            queue: queue_rx,
            conns: conns_rx,
        };
        shared.rt.spawn(task.run(stop));
        StreamWriter {
            queue,
            attached,
            conns,
        }
    }

    /// Whether a connection is attached, i.e. whether `pick` may use this stream.
    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Queues `m` without waiting; gives it back if the queue is full or closed.
    // The message is handed back by value so the caller can report it; boxing it
    // would cost an allocation per message on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, m: Message) -> Result<(), Message> {
        self.queue.try_send(m).map_err(|e| match e {
            TrySendError::Full(m) | TrySendError::Closed(m) => m,
        })
    }

    /// Messages waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Hands a new connection to the writer; false if the writer has stopped.
    pub async fn attach(&self, conn: OutgoingConn) -> bool {
        self.conns.send(conn).await.is_ok()
    }
}

struct WriterTask {
    shared: Arc<Shared>,
    peer: u64,
    kind: StreamKind,
    status: Arc<PeerStatus>,
    attached: Arc<AtomicBool>,
    queue: mpsc::Receiver<Message>,
    conns: mpsc::Receiver<OutgoingConn>,
}

/// The attached connection with its per-connection encoder state.
struct Conn {
    chunks: mpsc::Sender<Bytes>,
    enc: Box<dyn Encoder>,
}

impl WriterTask {
    async fn run(mut self, stop: CancellationToken) {
        let mut conn: Option<Conn> = None;
        let mut batch: Vec<u8> = Vec::new();
        let start = tokio::time::Instant::now() + HEARTBEAT_INTERVAL;
        let mut heartbeat = tokio::time::interval_at(start, HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(new) = self.conns.recv() => {
                    if conn.is_some() {
                        tracing::info!(peer = %format_args!("{:x}", self.peer), kind = %self.kind, "replaced streaming connection with a newer one");
                    }
                    conn = Some(Conn { chunks: new.chunks, enc: self.kind.encoder() });
                    self.attached.store(true, Ordering::Release);
                    self.status.activate();
                    tracing::info!(peer = %format_args!("{:x}", self.peer), kind = %self.kind, "established streaming connection (writer)");
                }
                Some(m) = self.queue.recv(), if conn.is_some() => {
                    let Some(c) = conn.as_mut() else { continue };
                    let to = m.to;
                    self.encode(c, &m, &mut batch);
                    for _ in 1..MAX_BATCH {
                        match self.queue.try_recv() {
                            Ok(m) => self.encode(c, &m, &mut batch),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = flush(c, &mut batch).await {
                        self.lost(&mut conn, e);
                        self.shared.raft.report_unreachable(to);
                    }
                }
                _ = heartbeat.tick(), if conn.is_some() => {
                    let Some(c) = conn.as_mut() else { continue };
                    self.encode(c, &link_heartbeat(), &mut batch);
                    if let Err(e) = flush(c, &mut batch).await {
                        self.lost(&mut conn, e);
                    }
                }
            }
        }
        // Dropping `conn` ends the response body, so the HTTP server can shut down.
        self.attached.store(false, Ordering::Release);
        if conn.is_some() {
            tracing::info!(peer = %format_args!("{:x}", self.peer), kind = %self.kind, "closed streaming connection (writer stopped)");
        }
    }

    fn encode(&self, c: &mut Conn, m: &Message, batch: &mut Vec<u8>) {
        if let Err(e) = c.enc.encode(m, batch) {
            // Only a protobuf writer error can land here; drop the one message.
            tracing::error!(peer = %format_args!("{:x}", self.peer), kind = %self.kind, error = %e, "failed to encode message; dropped it");
        }
    }

    /// The connection failed: detach, drop what was queued for it, tell raft.
    fn lost(&mut self, conn: &mut Option<Conn>, err: &'static str) {
        *conn = None;
        self.attached.store(false, Ordering::Release);
        self.status
            .deactivate(&format!("{} writer", self.kind), &err);
        tracing::warn!(peer = %format_args!("{:x}", self.peer), kind = %self.kind, error = err, "lost streaming connection (writer)");
        let mut dropped = 0usize;
        while self.queue.try_recv().is_ok() {
            dropped += 1;
        }
        if dropped > 0 {
            self.shared.raft.report_unreachable(self.peer);
        }
    }
}

/// Sends the batch as one body chunk.
async fn flush(c: &mut Conn, batch: &mut Vec<u8>) -> Result<(), &'static str> {
    if batch.is_empty() {
        return Ok(());
    }
    // The next batch starts at about this one's size, but a rare huge batch (a big
    // entry) does not make every later buffer huge.
    let cap = batch.len().clamp(4096, 1 << 20);
    let chunk = Bytes::from(std::mem::replace(batch, Vec::with_capacity(cap)));
    match tokio::time::timeout(WRITE_TIMEOUT, c.chunks.send(chunk)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("connection closed by peer"),
        Err(_) => Err("write timed out: peer stopped reading"),
    }
}
