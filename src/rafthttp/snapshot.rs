//! Snapshots on their own connection (etcd `snapshot_sender.go` and the snapshot
//! handler in `http.go`).
//!
//! `POST /raft/snapshot`, `Content-Type: application/octet-stream`, body in etcd's
//! "merged snapshot" layout:
//!
//! ```text
//! | offset | bytes | description                                             |
//! +--------+-------+---------------------------------------------------------+
//! | 0      | 8     | n = length of the message, u64 BE                       |
//! | 8      | n     | the MsgSnapshot protobuf, with `snapshot.data` empty     |
//! | 8 + n  | rest  | the snapshot data, raw (Content-Length says how much)   |
//! ```
//!
//! Sending each snapshot in its own request keeps it from delaying any other
//! message. etcd's raftexample sent `MsgSnap` over the pipeline instead (one
//! protobuf, no size known before parsing); this layout lets the receiver check the
//! message first and then read the data straight into a buffer of the right size.
//!
//! The sender reports `Finish` to raft on 204 and `Failure` (plus unreachable)
//! otherwise. The receiver answers 204 only after raft took the message.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use raft::SnapshotStatus;
use raft::eraftpb::{Message, MessageType};

use super::http::{compat_error, content_length, http_error, process_error, with_cluster_id};
use super::msg_codec::{Decoded, Decoder, MessageDecoder, encode_frame};
use super::peer_status::PeerStatus;
use super::urlpick::UrlPicker;
use super::util::{TransportError, check_cluster_compat, post, raft_request};
use super::{Shared, Transport};

/// The most a receiver reserves before the snapshot data actually arrives.
const INITIAL_RESERVE: u64 = 16 * 1024 * 1024;

/// Largest accepted message header (etcd main's `snapshotLimitByte`).
pub const MAX_SNAPSHOT_HEADER: u64 = 64 * 1024 * 1024;
/// Largest accepted snapshot data. The receiver allocates the declared size up
/// front, so this bounds what a request can make it reserve.
pub const MAX_SNAPSHOT_DATA: u64 = 1024 * 1024 * 1024;

/// Sends one `MsgSnapshot` and tells raft how it went.
pub async fn send(
    shared: Arc<Shared>,
    picker: Arc<UrlPicker>,
    status: Arc<PeerStatus>,
    m: Message,
) {
    let to = m.to;
    let url = picker.pick();
    let index = m.snapshot.as_ref().map_or(0, |s| s.get_metadata().index);
    tracing::info!(peer = %format_args!("{to:x}"), index, "sending snapshot");
    match post_snapshot(&shared, &url, m).await {
        Ok(()) => {
            status.activate();
            tracing::info!(peer = %format_args!("{to:x}"), index, "sent snapshot");
            shared.raft.report_snapshot(to, SnapshotStatus::Finish);
        }
        Err(e) => {
            tracing::warn!(peer = %format_args!("{to:x}"), index, error = %e, "failed to send snapshot");
            shared.check_removed(&e);
            picker.unreachable(&url);
            status.deactivate("snapshot sender", &e);
            shared.raft.report_unreachable(to);
            shared.raft.report_snapshot(to, SnapshotStatus::Failure);
        }
    }
}

async fn post_snapshot(s: &Shared, url: &str, mut m: Message) -> Result<(), TransportError> {
    if url.is_empty() {
        return Err(TransportError::NoUrl);
    }
    let data = m.mut_snapshot().take_data();
    let head = Bytes::from(encode_frame(&m)?);
    let len = head.len() + data.len();
    let chunks = [head, data].map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let body = StreamBody::new(futures::stream::iter(chunks)).boxed();
    let req = raft_request(
        Method::POST,
        url,
        "/raft/snapshot",
        &s.id_hex,
        &s.cluster_hex,
    )?
    .header(header::CONTENT_TYPE, "application/octet-stream")
    .header(header::CONTENT_LENGTH, len)
    .body(body)?;
    // raft sends no other snapshot to this peer until this one is reported, so a
    // peer that never answers must not hold it forever: allow 30 s plus 1 s per MB.
    let deadline = Duration::from_secs(30) + Duration::from_micros(len as u64);
    post(&s.client, req, deadline).await
}

/// The `POST /raft/snapshot` handler.
pub async fn receive(State(tr): State<Transport>, headers: HeaderMap, body: Body) -> Response {
    let s = tr.shared().clone();
    let r = match check_cluster_compat(&headers, &s.cluster_hex) {
        Err(e) => compat_error(e),
        Ok(()) => receive_checked(&s, &headers, body)
            .await
            .unwrap_or_else(|e| e),
    };
    with_cluster_id(r, &s.cluster_hex)
}

async fn receive_checked(
    s: &Shared,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<Response, Response> {
    let bad = |msg: &str| http_error(StatusCode::BAD_REQUEST, msg);
    let too_large = || http_error(StatusCode::PAYLOAD_TOO_LARGE, "snapshot too large");
    // 1. The message header frame.
    let mut dec = MessageDecoder::new(MAX_SNAPSHOT_HEADER);
    let mut buf = BytesMut::new();
    let mut received = 0u64;
    let mut m = loop {
        match dec.decode(&mut buf) {
            Ok(Decoded::Message(m)) => break m,
            Ok(Decoded::NeedMore(n)) => {
                super::msg_codec::reserve_for_frame(&mut buf, n);
                match next_chunk(&mut body).await? {
                    Some(c) => {
                        received += c.len() as u64;
                        buf.extend_from_slice(&c);
                    }
                    None => return Err(bad("failed to decode raft message (unexpected EOF)")),
                }
            }
            Err(super::msg_codec::CodecError::TooLarge { .. }) => return Err(too_large()),
            Err(e) => return Err(bad(&format!("failed to decode raft message ({e})"))),
        }
    };
    if m.msg_type != MessageType::MsgSnapshot {
        return Err(bad("wrong raft message type"));
    }
    if s.raft.is_id_removed(m.from) {
        return Err(http_error(StatusCode::FORBIDDEN, "removed member"));
    }
    // Before reading up to a gigabyte of data.
    s.raft.check(&m).map_err(process_error)?;
    // 2. The data, into one buffer of the declared size.
    // What the header took on the wire (Go writes zero fields that we would not).
    let head_len = received - buf.len() as u64;
    let expected = match content_length(headers) {
        Some(cl) => Some(
            cl.checked_sub(head_len)
                .ok_or_else(|| bad("Content-Length shorter than the message"))?,
        ),
        None => None, // chunked (Go's sender): grow as it comes, still bounded
    };
    if expected.is_some_and(|n| n > MAX_SNAPSHOT_DATA) {
        return Err(too_large());
    }
    let limit = expected.unwrap_or(MAX_SNAPSHOT_DATA) as usize;
    // Reserve what the sender announced only up to a bound: a Content-Length is a claim, and
    // a stalled sender must not pin a gigabyte per request. Beyond it, grow as data arrives.
    let reserve = expected.map_or(buf.len(), |n| n.min(INITIAL_RESERVE) as usize);
    let mut data = Vec::with_capacity(reserve.max(buf.len()));
    data.extend_from_slice(&buf);
    while let Some(c) = next_chunk(&mut body).await? {
        if data.len() + c.len() > limit {
            return Err(too_large());
        }
        data.extend_from_slice(&c);
    }
    if expected.is_some_and(|n| n != data.len() as u64) || data.len() > limit {
        return Err(bad("snapshot data shorter or longer than Content-Length"));
    }
    tracing::info!(from = %format_args!("{:x}", m.from), index = m.get_snapshot().get_metadata().index, bytes = data.len(), "received snapshot");
    m.mut_snapshot().data = Bytes::from(data);
    s.raft.process(m).await.map_err(process_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn next_chunk(body: &mut Body) -> Result<Option<Bytes>, Response> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Err(_)) => {
                return Err(http_error(
                    StatusCode::BAD_REQUEST,
                    "error reading raft message",
                ));
            }
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    return Ok(Some(d));
                }
            }
        }
    }
}
