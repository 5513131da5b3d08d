//! The server side (etcd `http.go`): routes, the checks each request passes, and
//! the listener setup.
//!
//! | request | checks, in order | success |
//! |---|---|---|
//! | `POST /raft` | version/cluster (412), size (413), body (400), removed sender (403) | 204 after `process` |
//! | `GET /raft/stream/{msgapp,message}/<from>` | version/cluster (412), type (404 `invalid path`), `<from>` hex (404 `invalid from`), removed (410), known peer (404 `error sender not found`), `X-Raft-To` = our id (412 `to field mismatch`) | 200, body stays open |
//! | `POST /raft/snapshot` | see [`snapshot`](super::snapshot) | 204 after `process` |
//! | `GET /raft/probing` | none | 200 `{"OK":true,"Now":...}` |
//!
//! Error bodies are one line ending in `\n`, as Go's `http.Error` writes them, since
//! Go peers compare the 412 text. Wrong methods get 405 with `Allow`.

use std::convert::Infallible;
use std::future::Future;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::net::{TcpListener, TcpStream};

use crate::http_server::Limits;

use super::msg_codec::MAX_FRAME_BYTES;
use super::stream_writer::{OutgoingConn, StreamKind};
use super::util::{
    CompatError, HDR_CLUSTER_ID, HDR_RAFT_TO, HDR_SERVER_VERSION, TCP_KEEPALIVE, VERSION,
    check_cluster_compat, parse_id,
};
use super::{ProcessError, Transport, probing, snapshot};

/// Largest pipeline body accepted. etcd has no total limit; this matches its
/// per-frame stream limit.
pub const MAX_PIPELINE_BYTES: u64 = MAX_FRAME_BYTES;

pub fn router(tr: Transport) -> Router {
    Router::new()
        .route("/raft", post(pipeline_handler))
        .route("/raft/stream/{kind}/{from}", get(stream_handler))
        .route("/raft/snapshot", post(snapshot::receive))
        .route("/raft/probing", get(probing::handler))
        .with_state(tr)
}

/// Serves `router` on an already-bound listener within `limits` (see
/// [`crate::http_server`]) until `shutdown` resolves, with TCP_NODELAY and a
/// 3-minute TCP keep-alive on every connection (raftexample's `listener.go`).
/// Open stream responses end when the transport stops, so the graceful shutdown
/// does not wait on them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::http_server::serve(listener, router, limits, shutdown, tune_socket).await
}

fn tune_socket(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(error = %e, "could not set TCP_NODELAY on raft connection");
    }
    let ka = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::warn!(error = %e, "could not set TCP keep-alive on raft connection");
    }
}

/// A plain-text error as Go's `http.Error` writes it.
pub fn http_error(code: StatusCode, msg: &str) -> Response {
    let mut r = (code, format!("{msg}\n")).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// 412 with the exact text Go clients compare against.
pub fn compat_error(e: CompatError) -> Response {
    http_error(StatusCode::PRECONDITION_FAILED, &e.to_string())
}

/// Adds `X-Etcd-Cluster-ID` (all handlers answer with it).
pub fn with_cluster_id(mut r: Response, cluster_hex: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cluster_hex) {
        r.headers_mut().insert(HDR_CLUSTER_ID, v);
    }
    r
}

/// The answer to a message raft refused.
pub fn process_error(e: ProcessError) -> Response {
    match e {
        // etcdserver answers 403 for a removed sender; Go peers map it to errMemberRemoved.
        ProcessError::MemberRemoved => http_error(StatusCode::FORBIDDEN, "removed member"),
        ProcessError::Invalid(_) => http_error(StatusCode::BAD_REQUEST, &e.to_string()),
        ProcessError::Stopped => http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "error processing raft message",
        ),
    }
}

/// Reads a whole body of at most `limit` bytes: 413 if it is larger, 400 if it
/// cannot be read.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<bytes::Bytes, Response> {
    let too_large = || http_error(StatusCode::PAYLOAD_TOO_LARGE, "raft message too large");
    if content_length(headers).is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) if crate::http_server::BodyStalled::is_cause_of(&*e) => Err(http_error(
            StatusCode::REQUEST_TIMEOUT,
            "raft message body stopped arriving",
        )),
        Err(_) => Err(http_error(
            StatusCode::BAD_REQUEST,
            "error reading raft message",
        )),
    }
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

async fn pipeline_handler(State(tr): State<Transport>, headers: HeaderMap, body: Body) -> Response {
    let s = tr.shared().clone();
    let r = async {
        check_cluster_compat(&headers, &s.cluster_hex).map_err(compat_error)?;
        let b = read_body(&headers, body, MAX_PIPELINE_BYTES).await?;
        let m = super::pb_bounds::parse_message(&b).map_err(|e| {
            tracing::warn!(error = %e, "failed to unmarshal raft message from pipeline");
            http_error(StatusCode::BAD_REQUEST, "error unmarshalling raft message")
        })?;
        if s.raft.is_id_removed(m.from) {
            return Err(http_error(StatusCode::FORBIDDEN, "removed member"));
        }
        s.raft.process(m).await.map_err(process_error)?;
        Ok::<_, Response>(StatusCode::NO_CONTENT.into_response())
    };
    with_cluster_id(r.await.unwrap_or_else(|e| e), &s.cluster_hex)
}

async fn stream_handler(
    State(tr): State<Transport>,
    Path((kind, from)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let cluster_hex = tr.shared().cluster_hex.clone();
    let mut r = accept_stream(&tr, &kind, &from, &headers)
        .await
        .unwrap_or_else(|e| e);
    r.headers_mut()
        .insert(HDR_SERVER_VERSION, HeaderValue::from_static(VERSION));
    with_cluster_id(r, &cluster_hex)
}

async fn accept_stream(
    tr: &Transport,
    kind: &str,
    from: &str,
    headers: &HeaderMap,
) -> Result<Response, Response> {
    let s = tr.shared();
    check_cluster_compat(headers, &s.cluster_hex).map_err(compat_error)?;
    let not_found = |msg| http_error(StatusCode::NOT_FOUND, msg);
    let kind = StreamKind::from_segment(kind).ok_or_else(|| not_found("invalid path"))?;
    let from = parse_id(from).ok_or_else(|| not_found("invalid from"))?;
    if s.raft.is_id_removed(from) {
        tracing::warn!(from = %format_args!("{from:x}"), "rejected stream from removed member");
        return Err(http_error(StatusCode::GONE, "removed member"));
    }
    let Some(peer) = tr.peer(from) else {
        tracing::warn!(from = %format_args!("{from:x}"), "rejected stream from unknown member (a new node must be added with POST /<id> before it starts)");
        return Err(not_found("error sender not found"));
    };
    let to = headers.get(HDR_RAFT_TO).and_then(|v| v.to_str().ok());
    if to != Some(s.id_hex.as_str()) {
        tracing::warn!(from = %format_args!("{from:x}"), ?to, "rejected stream: X-Raft-To is not this member");
        return Err(http_error(
            StatusCode::PRECONDITION_FAILED,
            "to field mismatch",
        ));
    }
    let (conn, mut chunks) = OutgoingConn::new();
    if !peer.writer(kind).attach(conn).await {
        return Err(not_found("error sender not found"));
    }
    let stream = futures::stream::poll_fn(move |cx| {
        chunks.poll_recv(cx).map(|c| c.map(Ok::<_, Infallible>))
    });
    Ok((StatusCode::OK, Body::from_stream(stream)).into_response())
}
