//! One remote member (etcd `peer.go`): its two stream writers, two stream
//! readers, pipeline, snapshot sender and prober, and [`Peer::pick`], which decides
//! how each message leaves.
//!
//! Streams are preferred because a message costs a few bytes in an open response;
//! the pipeline costs an HTTP request per message and exists for when no stream is
//! attached (the peer has not dialed us yet, or its connection dropped). A snapshot
//! is large and would hold up everything behind it on a stream, so it always goes
//! in its own request.

use std::sync::Arc;

use raft::SnapshotStatus;
use raft::eraftpb::{Message, MessageType};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::peer_status::{PeerStatus, PeerStatusReport};
use super::pipeline::{Pipeline, PipelineCtx};
use super::stream_reader::{self, ReaderCtx};
use super::stream_writer::{StreamKind, StreamWriter};
use super::urlpick::UrlPicker;
use super::{probing, snapshot};

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Snapshot,
    Stream(StreamKind),
    Pipeline,
}

pub struct Peer {
    id: u64,
    shared: Arc<Shared>,
    status: Arc<PeerStatus>,
    picker: Arc<UrlPicker>,
    msgapp: StreamWriter,
    message: StreamWriter,
    pipeline: Pipeline,
    /// Cancelled by `stop`; ends every task of this peer.
    stop: CancellationToken,
    /// This peer's `raftexample_peer_messages_{sent,dropped}_total` (looked up once, not per
    /// message).
    sent: prometheus::IntCounter,
    dropped: prometheus::IntCounter,
}

impl Peer {
    /// Starts all of the peer's tasks on the transport's runtime.
    pub fn start(shared: Arc<Shared>, id: u64, urls: &[String], stop: CancellationToken) -> Peer {
        let status = Arc::new(PeerStatus::new(shared.id, id));
        let picker = Arc::new(UrlPicker::new(urls));
        let writer =
            |kind| StreamWriter::start(shared.clone(), id, kind, status.clone(), stop.clone());
        let (msgapp, message) = (writer(StreamKind::MsgAppV2), writer(StreamKind::Message));
        let pipeline = Pipeline::start(
            PipelineCtx {
                shared: shared.clone(),
                peer: id,
                picker: picker.clone(),
                status: status.clone(),
            },
            stop.clone(),
        );
        for kind in [StreamKind::MsgAppV2, StreamKind::Message] {
            let ctx = ReaderCtx {
                shared: shared.clone(),
                peer: id,
                kind,
                picker: picker.clone(),
                status: status.clone(),
            };
            shared.rt.spawn(stream_reader::run(ctx, stop.clone()));
        }
        let prober = probing::run(
            shared.clone(),
            id,
            picker.clone(),
            status.clone(),
            stop.clone(),
        );
        shared.rt.spawn(prober);
        let label = id.to_string();
        Peer {
            id,
            shared,
            status,
            picker,
            msgapp,
            message,
            pipeline,
            stop,
            sent: crate::metrics::PEER_SENT.with_label_values(&[&label]),
            dropped: crate::metrics::PEER_DROPPED.with_label_values(&[&label]),
        }
    }

    /// etcd's `pick`: snapshot → its own request; `MsgAppend` → msgapp stream;
    /// anything → message stream; pipeline when the chosen stream is not attached.
    pub fn pick(&self, m: &Message) -> Route {
        if m.msg_type == MessageType::MsgSnapshot {
            Route::Snapshot
        } else if m.msg_type == MessageType::MsgAppend && self.msgapp.is_attached() {
            Route::Stream(StreamKind::MsgAppV2)
        } else if self.message.is_attached() {
            Route::Stream(StreamKind::Message)
        } else {
            Route::Pipeline
        }
    }

    /// Queues `m` without blocking. If the chosen queue is full the message is
    /// dropped and raft hears the peer is unreachable; raft will resend.
    pub fn send(&self, m: Message) {
        let route = self.pick(&m);
        let queued = match route {
            Route::Snapshot => {
                let (s, p, st) = (
                    self.shared.clone(),
                    self.picker.clone(),
                    self.status.clone(),
                );
                let stop = self.stop.clone();
                self.sent.inc();
                self.shared.rt.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        () = snapshot::send(s, p, st, m) => {}
                    }
                });
                return;
            }
            Route::Stream(kind) => self.writer(kind).try_send(m),
            Route::Pipeline => self.pipeline.try_send(m),
        };
        if queued.is_ok() {
            self.sent.inc();
        }
        if let Err(m) = queued {
            self.dropped.inc();
            tracing::debug!(peer = %format_args!("{:x}", self.id), ?route, msg_type = ?m.msg_type, active = self.status.is_active(), "dropped message: sending buffer is full");
            self.shared.raft.report_unreachable(m.to);
            if m.msg_type == MessageType::MsgSnapshot {
                self.shared
                    .raft
                    .report_snapshot(m.to, SnapshotStatus::Failure);
            }
        }
    }

    pub fn writer(&self, kind: StreamKind) -> &StreamWriter {
        match kind {
            StreamKind::MsgAppV2 => &self.msgapp,
            StreamKind::Message => &self.message,
        }
    }

    pub fn update(&self, urls: &[String]) {
        self.picker.update(urls);
    }

    pub fn status(&self) -> &PeerStatus {
        &self.status
    }

    pub fn report(&self) -> PeerStatusReport {
        PeerStatusReport {
            msgapp_stream: self.msgapp.is_attached(),
            message_stream: self.message.is_attached(),
            queued: self.msgapp.queued() + self.message.queued() + self.pipeline.queued(),
            ..self.status.report(self.picker.pick())
        }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}
