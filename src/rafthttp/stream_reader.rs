//! The reading end of a stream (etcd `streamReader`, `stream.go:332-700`).
//!
//! For each peer and stream type one task dials `GET {peer}/raft/stream/{type}/<our
//! id>` with `X-Raft-To: <peer id>`; the peer keeps the response open and writes its
//! messages for us into it. The task decodes frames from a receive buffer filled a
//! chunk at a time (one read yields many frames), drops link heartbeats and hands
//! every other message to [`Raft::process`](super::Raft::process), awaiting it: a
//! busy node slows the stream down rather than losing messages (etcd drops them when
//! its 4096-slot receive buffer is full).
//!
//! A stream that stays silent for [`CONN_READ_TIMEOUT`] is dropped, and every
//! failed dial or lost stream is followed by a new dial at most every
//! [`DIAL_RETRY`] (etcd's `rate.Every(100ms)` limiter), until the peer is removed.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use bytes::BytesMut;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::msg_codec::{CodecError, Decoded, Decoder, MessageDecoder};
use super::msgappv2_codec::MsgAppV2Decoder;
use super::peer_status::PeerStatus;
use super::stream_writer::{CONN_READ_TIMEOUT, StreamKind};
use super::urlpick::UrlPicker;
use super::util::{
    DIAL_TIMEOUT, HDR_RAFT_TO, HDR_SERVER_VERSION, TransportError, error_text, id_to_hex,
    is_link_heartbeat, raft_request, stream_supported,
};
use super::{ProcessError, Shared};

/// At most one dial per this long per stream.
pub const DIAL_RETRY: Duration = Duration::from_millis(100);
/// The receive buffer starts this big and grows only for larger frames.
const READ_BUF: usize = 64 * 1024;

/// Why an open stream ended.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("peer closed the stream")]
    Eof,
    #[error("bad frame: {0}")]
    Codec(#[from] CodecError),
    #[error("connection error: {0}")]
    Http(#[from] hyper::Error),
    #[error("no data or heartbeat for {0:?}")]
    Timeout(Duration),
    #[error("raft node stopped")]
    Stopped,
}

/// What a reader task needs to know about its peer.
pub struct ReaderCtx {
    pub shared: Arc<Shared>,
    pub peer: u64,
    pub kind: StreamKind,
    pub picker: Arc<UrlPicker>,
    pub status: Arc<PeerStatus>,
}

/// Dials, reads, and redials until `stop` is cancelled.
pub async fn run(ctx: ReaderCtx, stop: CancellationToken) {
    let mut next_dial = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            () = ctx.connect_once(&mut next_dial) => {}
        }
    }
}

impl ReaderCtx {
    async fn connect_once(&self, next_dial: &mut Instant) {
        tokio::time::sleep_until(*next_dial).await;
        *next_dial = Instant::now() + DIAL_RETRY;
        let body = match self.dial().await {
            Ok(body) => body,
            Err(e) => {
                self.shared.check_removed(&e);
                self.status
                    .deactivate(&format!("{} reader dial", self.kind), &e);
                return;
            }
        };
        self.status.activate();
        tracing::info!(peer = %format_args!("{:x}", self.peer), kind = %self.kind, "established streaming connection (reader)");
        crate::metrics::PEER_RECONNECTS
            .with_label_values(&[&self.peer.to_string()])
            .inc();
        let err = self.decode_loop(body).await;
        tracing::warn!(peer = %format_args!("{:x}", self.peer), kind = %self.kind, error = %err, "lost streaming connection (reader)");
        // A clean end (the peer replaced or closed the stream) is not a failure.
        if !matches!(err, ReadError::Eof) {
            self.status
                .deactivate(&format!("{} reader", self.kind), &err);
        }
    }

    async fn dial(&self) -> Result<Incoming, TransportError> {
        let url = self.picker.pick();
        if url.is_empty() {
            return Err(TransportError::NoUrl);
        }
        let r = self.dial_url(&url).await;
        if r.is_err() {
            self.picker.unreachable(&url);
        }
        r
    }

    async fn dial_url(&self, url: &str) -> Result<Incoming, TransportError> {
        let s = &self.shared;
        let path = format!("/raft/stream/{}/{}", self.kind.segment(), s.id_hex);
        let req = raft_request(Method::GET, url, &path, &s.id_hex, &s.cluster_hex)?
            .header(HDR_RAFT_TO, id_to_hex(self.peer))
            .body(Empty::new().boxed())?;
        let resp = tokio::time::timeout(DIAL_TIMEOUT, s.client.request(req))
            .await
            .map_err(|_| TransportError::Timeout(DIAL_TIMEOUT))??;
        let rv = resp
            .headers()
            .get(HDR_SERVER_VERSION)
            .and_then(|v| v.to_str().ok());
        let rv = rv.unwrap_or("2.0.0");
        if !stream_supported(rv) {
            return Err(TransportError::UnsupportedStream(rv.to_string()));
        }
        match resp.status() {
            StatusCode::OK => Ok(resp.into_body()),
            StatusCode::GONE => Err(TransportError::MemberRemoved),
            StatusCode::NOT_FOUND => Err(TransportError::NotFound),
            StatusCode::PRECONDITION_FAILED => {
                Err(TransportError::Precondition(error_text(resp).await))
            }
            s => Err(TransportError::Status(s)),
        }
    }

    /// Reads frames until the stream ends; returns why it ended.
    async fn decode_loop(&self, mut body: Incoming) -> ReadError {
        let mut dec: Box<dyn Decoder> = match self.kind {
            StreamKind::MsgAppV2 => Box::new(MsgAppV2Decoder::new(self.shared.id, self.peer)),
            StreamKind::Message => Box::new(MessageDecoder::default()),
        };
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let deadline = tokio::time::sleep(CONN_READ_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            // Take every whole frame out of the buffer before reading again.
            loop {
                match dec.decode(&mut buf) {
                    Ok(Decoded::Message(m)) => {
                        if is_link_heartbeat(&m) {
                            continue;
                        }
                        match self.shared.raft.process(m).await {
                            Ok(()) => {}
                            Err(ProcessError::Stopped) => return ReadError::Stopped,
                            Err(e @ (ProcessError::MemberRemoved | ProcessError::Invalid(_))) => {
                                tracing::debug!(peer = %format_args!("{:x}", self.peer), error = %e, "raft refused a message");
                            }
                        }
                    }
                    Ok(Decoded::NeedMore(n)) => {
                        // Grow once to the whole frame (up to a bound) rather than chunk by chunk.
                        super::msg_codec::reserve_for_frame(&mut buf, n);
                        break;
                    }
                    Err(e) => return e.into(),
                }
            }
            // Time spent in `process` (backpressure) does not count as silence.
            deadline.as_mut().reset(Instant::now() + CONN_READ_TIMEOUT);
            let frame = tokio::select! {
                f = body.frame() => f,
                () = &mut deadline => return ReadError::Timeout(CONN_READ_TIMEOUT),
            };
            match frame {
                None if buf.is_empty() => return ReadError::Eof,
                None => return CodecError::Truncated(buf.len()).into(),
                Some(Err(e)) => return e.into(),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
