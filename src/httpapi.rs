//! The key-value HTTP API (Go: `httpapi.go`).
//!
//! | request | effect | answer |
//! |---|---|---|
//! | `PUT /<key>`, body = value | propose `key = value` | 204 once proposed (not yet committed) |
//! | `GET /<key>` | read the local map | 200 + value, or 404 |
//! | `POST /<id>`, body = raft URL | propose adding node `id` | 204 once proposed |
//! | `DELETE /<id>` | propose removing node `id` | 204 once proposed; 404 if not a member |
//! | anything else | — | 405, `Allow: PUT, GET, POST, DELETE` |
//!
//! The key is the whole request URI, query string included, as in Go (`r.RequestURI`).
//!
//! Beyond the Go original, a request with the header `X-Linearizable: true` is linearizable: a
//! PUT answers only once its entry is committed and applied on this node, a GET only after a
//! raft ReadIndex round confirmed this node is up to date. Without a quorum the answer is 503
//! after the request timeout. (A header, because the whole URI is the key.)

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use raft::eraftpb::{ConfChange, ConfChangeType};
use tokio::sync::{mpsc, watch};

use std::time::Duration;

use crate::http_server;
use crate::kvstore::{KvStore, LinearizableError};
use crate::ops::NodeStatus;

/// The largest value (or URL) a request may carry. The Go original has no limit; an unbounded
/// body would let one request exhaust memory, so larger ones get a 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The header that makes a request linearizable.
pub const LINEARIZABLE_HEADER: &str = "x-linearizable";

#[derive(Clone)]
struct Api {
    kvs: KvStore,
    /// *confChangeC*: membership changes for the raft node.
    conf_change_tx: mpsc::Sender<ConfChange>,
    /// How long a linearizable request may wait for a quorum.
    request_timeout: Duration,
    /// The node's latest state, for membership checks (None in tests without a node).
    status: Option<watch::Receiver<NodeStatus>>,
}

/// A request the API refuses, as a status code and a message for the client.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

fn stopped() -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the raft node has stopped; restart this node".into(),
    )
}

/// The router for the key-value port. Every path is a key, so it is all one fallback handler.
pub fn router(
    kvs: KvStore,
    conf_change_tx: mpsc::Sender<ConfChange>,
    request_timeout: Duration,
    status: Option<watch::Receiver<NodeStatus>>,
) -> Router {
    Router::new().fallback(serve_kv).with_state(Api {
        kvs,
        conf_change_tx,
        request_timeout,
        status,
    })
}

/// Serves `router` on `listener` within `limits` (see [`http_server`]) until `shutdown`
/// resolves, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: http_server::Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    http_server::serve(listener, router, limits, shutdown, http_server::no_tap).await
}

async fn serve_kv(State(api): State<Api>, req: Request) -> Response {
    let method = req.method().clone();
    let resp = handle(api, req).await.into_response();
    crate::metrics::HTTP_REQUESTS
        .with_label_values(&[method.as_str(), resp.status().as_str()])
        .inc();
    resp
}

fn linearizable(req: &Request) -> Result<bool, ApiError> {
    match req.headers().get(LINEARIZABLE_HEADER) {
        None => Ok(false),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"true") => Ok(true),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"false") => Ok(false),
        Some(_) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            "X-Linearizable must be true or false".into(),
        )),
    }
}

fn unavailable(e: LinearizableError) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

async fn handle(api: Api, req: Request) -> Result<Response, ApiError> {
    let linearizable = linearizable(&req)?;
    let key = request_key(&req)?;
    let method = req.method().clone();
    match method {
        Method::PUT => {
            let val = read_body(req.into_body()).await?;
            if linearizable {
                api.kvs
                    .propose_and_wait(&key, &val, api.request_timeout)
                    .await
                    .map_err(unavailable)?;
            } else {
                // Optimistic, as the Go original: the write is applied once it commits.
                api.kvs.propose(&key, &val).await.map_err(|_| stopped())?;
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Method::GET => {
            let found = if linearizable {
                api.kvs
                    .linearizable_lookup(&key, api.request_timeout)
                    .await
                    .map_err(unavailable)?
            } else {
                api.kvs.lookup(&key)
            };
            match found {
                Some(v) => Ok(([(header::CONTENT_TYPE, content_type(&v))], v).into_response()),
                None => Err(ApiError(StatusCode::NOT_FOUND, "Failed to GET".into())),
            }
        }
        Method::POST => {
            let node_id = parse_node_id(&key)?;
            let body = read_body(req.into_body()).await?;
            let url = parse_peer_url(&body)?;
            let removed = api
                .status
                .as_ref()
                .is_some_and(|s| s.borrow().removed.contains(&node_id));
            if removed {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!(
                        "node {node_id} was removed from this cluster and its id cannot be \
                         reused; add the new node under a new id"
                    ),
                ));
            }
            let mut cc = ConfChange::default();
            cc.set_change_type(ConfChangeType::AddNode);
            cc.node_id = node_id;
            cc.context = url.into_bytes().into();
            send_conf_change(&api, cc).await
        }
        Method::DELETE => {
            let node_id = parse_node_id(&key)?;
            let member = api
                .status
                .as_ref()
                .is_none_or(|s| s.borrow().voters.contains(&node_id));
            if !member {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!(
                        "node {node_id} is not a member of this cluster (as far as this node has \
                         applied); the members are in GET /status on the raft port"
                    ),
                ));
            }
            let mut cc = ConfChange::default();
            cc.set_change_type(ConfChangeType::RemoveNode);
            cc.node_id = node_id;
            send_conf_change(&api, cc).await
        }
        _ => Ok((
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "PUT, GET, POST, DELETE")],
            "Method not allowed\n",
        )
            .into_response()),
    }
}

/// The key of a request: its request target as sent, like Go's `r.RequestURI`. Requests Go's
/// server refuses with a 400 are refused here too: an HTTP/1.1 request without `Host`, a target
/// that is neither a path nor an absolute URL, and a path with a malformed `%` escape.
fn request_key(req: &Request) -> Result<String, ApiError> {
    let bad = |why: &str| ApiError(StatusCode::BAD_REQUEST, why.to_owned());
    if req.version() == axum::http::Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
        return Err(bad("missing required Host header"));
    }
    let uri = req.uri();
    let key = if uri.scheme().is_some() {
        // Absolute form (`PUT http://host/k`): Go's key is the whole URL.
        uri.to_string()
    } else {
        match uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.as_str().to_owned(),
            _ => {
                return Err(bad(
                    "the request target must be a path starting with /, e.g. /my-key",
                ));
            }
        }
    };
    if !valid_escapes(uri.path()) {
        return Err(bad(
            "invalid URL escape in the path: % must be followed by two hex digits",
        ));
    }
    Ok(key)
}

/// Whether every `%` in `path` starts a `%XX` escape (Go's `url.PathUnescape` check).
fn valid_escapes(path: &str) -> bool {
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// The `Content-Type` of a value: text if its first 512 bytes hold no control bytes other than
/// whitespace (the rule Go's `http.DetectContentType` applies, so curl and browsers show text
/// values as the Go original's did), else binary. Unlike Go it never says `text/html`: a stored
/// value must not run as a page in the browser of whoever reads it.
fn content_type(v: &[u8]) -> &'static str {
    let binary = |c: &u8| matches!(c, 0x00..=0x08 | 0x0B | 0x0E..=0x1A | 0x1C..=0x1F);
    if v[..v.len().min(512)].iter().any(binary) {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    }
}

async fn send_conf_change(api: &Api, cc: ConfChange) -> Result<Response, ApiError> {
    api.conf_change_tx.send(cc).await.map_err(|_| stopped())?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn read_body(body: Body) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            // `to_bytes` reports the limit as a `LengthLimitError` somewhere in the chain.
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {MAX_BODY_BYTES} bytes"),
                )
            } else if http_server::BodyStalled::is_cause_of(&e) {
                ApiError(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("{e}; send the whole body without pausing"),
                )
            } else {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("failed to read the body: {e}"),
                )
            }
        })
}

/// Parses the node id of `POST /<id>` and `DELETE /<id>` as Go's `strconv.ParseUint(s, 0, 64)`
/// does: decimal, or `0x` hex, `0o`/leading-`0` octal, `0b` binary.
pub fn parse_node_id(key: &str) -> Result<u64, ApiError> {
    let s = key.strip_prefix('/').unwrap_or(key);
    let bad = |why: &str| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("Failed on {key}: {why}; the path must be a node id, e.g. /4"),
        )
    };
    let lower = s.to_ascii_lowercase();
    let parsed = if let Some(h) = lower.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else if let Some(o) = lower.strip_prefix("0o") {
        u64::from_str_radix(o, 8)
    } else if let Some(b) = lower.strip_prefix("0b") {
        u64::from_str_radix(b, 2)
    } else if lower.len() > 1 && lower.starts_with('0') {
        u64::from_str_radix(&lower[1..], 8)
    } else {
        lower.parse::<u64>()
    };
    match parsed {
        Ok(0) => Err(bad("node id 0 is reserved")),
        Ok(id) => Ok(id),
        Err(e) => Err(bad(&format!("not a node id ({e})"))),
    }
}

/// Checks the body of `POST /<id>`: the new member's raft URL, `http://host:port`.
pub fn parse_peer_url(body: &[u8]) -> Result<String, ApiError> {
    let bad = |why: String| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{why}; the body must be the new node's raft URL, e.g. http://127.0.0.1:42379"),
        )
    };
    let s = std::str::from_utf8(body)
        .map_err(|_| bad("the body is not UTF-8".into()))?
        .trim();
    if s.is_empty() {
        return Err(bad("empty body".into()));
    }
    crate::cli::host_port(s).map_err(bad)?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt as _;

    fn app() -> (
        Router,
        mpsc::Receiver<Vec<u8>>,
        mpsc::Receiver<ConfChange>,
        KvStore,
    ) {
        let (ptx, prx) = mpsc::channel(8);
        let (ctx, crx) = mpsc::channel(8);
        let kvs = KvStore::new(ptx);
        let status = NodeStatus {
            voters: vec![1, 2],
            removed: vec![3],
            ..Default::default()
        };
        let (_tx, status) = watch::channel(status);
        let r = router(kvs.clone(), ctx, Duration::from_millis(100), Some(status));
        (r, prx, crx, kvs)
    }

    async fn call(
        r: &Router,
        method: &str,
        uri: &str,
        body: &'static str,
    ) -> (StatusCode, Response) {
        let req = HttpRequest::builder()
            .header(header::HOST, "kv")
            .method(method)
            .uri(uri)
            .body(Body::from(body))
            .expect("request");
        let resp = r.clone().oneshot(req).await.expect("infallible");
        (resp.status(), resp)
    }

    #[tokio::test]
    async fn put_proposes_the_whole_uri_as_key() {
        let (r, mut prx, _crx, _kvs) = app();
        let (status, _) = call(&r, "PUT", "/my-key?x=1", "hello").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let proposed = prx.recv().await.expect("proposal");
        assert_eq!(proposed, crate::kvstore::encode("/my-key?x=1", b"hello", 0));
    }

    #[tokio::test]
    async fn get_of_a_missing_key_is_404() {
        let (r, _p, _c, _kvs) = app();
        assert_eq!(call(&r, "GET", "/nope", "").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn other_methods_get_405_with_allow() {
        let (r, _p, _c, _kvs) = app();
        let (status, resp) = call(&r, "PATCH", "/k", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "PUT, GET, POST, DELETE");
    }

    #[tokio::test]
    async fn post_and_delete_propose_conf_changes() {
        let (r, _p, mut crx, _kvs) = app();
        let (status, _) = call(&r, "POST", "/4", "http://127.0.0.1:42379").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let cc = crx.recv().await.expect("cc");
        assert_eq!(cc.get_change_type(), ConfChangeType::AddNode);
        assert_eq!(
            (cc.node_id, &cc.context[..]),
            (4, &b"http://127.0.0.1:42379"[..])
        );
        assert_eq!(
            call(&r, "DELETE", "/0x2", "").await.0,
            StatusCode::NO_CONTENT
        );
        let cc = crx.recv().await.expect("cc");
        assert_eq!(
            (cc.get_change_type(), cc.node_id),
            (ConfChangeType::RemoveNode, 2)
        );
    }

    #[tokio::test]
    async fn deleting_a_non_member_is_404_and_proposes_nothing() {
        let (r, _p, mut crx, _kvs) = app();
        for id in ["/9", "/3"] {
            let (status, resp) = call(&r, "DELETE", id, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{id}");
            let body = axum::body::to_bytes(resp.into_body(), 1024)
                .await
                .expect("body");
            assert!(
                String::from_utf8_lossy(&body).contains("not a member"),
                "{body:?}"
            );
        }
        assert!(crx.try_recv().is_err(), "nothing proposed");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_and_nothing_is_proposed() {
        let (r, mut prx, _c, _kvs) = app();
        let req = HttpRequest::builder()
            .header(header::HOST, "kv")
            .method("PUT")
            .uri("/big")
            .body(Body::from(vec![b'x'; MAX_BODY_BYTES + 1]))
            .expect("request");
        let resp = r.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(prx.try_recv().is_err(), "nothing proposed");
    }

    #[tokio::test]
    async fn a_removed_id_cannot_be_added_again() {
        let (r, _p, _c, _kvs) = app();
        let (status, _) = call(&r, "POST", "/3", "http://127.0.0.1:1").await;
        assert_eq!(status, StatusCode::CONFLICT);
    }

    #[tokio::test]
    async fn bad_membership_requests_are_400() {
        let (r, _p, _c, _kvs) = app();
        for (m, uri, body) in [
            ("POST", "/abc", "http://127.0.0.1:1"),
            ("POST", "/0", "http://127.0.0.1:1"),
            ("POST", "/4", ""),
            ("POST", "/4", "not a url"),
            ("DELETE", "/x", ""),
            ("DELETE", "/", ""),
        ] {
            assert_eq!(
                call(&r, m, uri, body).await.0,
                StatusCode::BAD_REQUEST,
                "{m} {uri} {body:?}"
            );
        }
    }

    #[tokio::test]
    async fn linearizable_requests_without_a_quorum_are_503() {
        let (r, _p, _c, _kvs) = app();
        for method in ["PUT", "GET"] {
            let req = HttpRequest::builder()
                .header(header::HOST, "kv")
                .method(method)
                .uri("/k")
                .header("X-Linearizable", "true")
                .body(Body::from("v"))
                .expect("request");
            let resp = r.clone().oneshot(req).await.expect("infallible");
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{method}");
        }
        let req = HttpRequest::builder()
            .header(header::HOST, "kv")
            .uri("/k")
            .header("X-Linearizable", "maybe")
            .body(Body::empty())
            .expect("request");
        let resp = r.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn node_ids_parse_like_go() {
        assert_eq!(parse_node_id("/10").ok(), Some(10));
        assert_eq!(parse_node_id("/0x10").ok(), Some(16));
        assert_eq!(parse_node_id("/010").ok(), Some(8));
        assert_eq!(parse_node_id("/0b11").ok(), Some(3));
        assert!(parse_node_id("/-1").is_err());
        assert!(parse_node_id("/18446744073709551616").is_err());
    }

    #[tokio::test]
    async fn requests_go_refuses_are_400_and_propose_nothing() {
        let (r, mut prx, _c, _kvs) = app();
        let no_host = HttpRequest::builder()
            .method("PUT")
            .uri("/k")
            .body(Body::from("v"))
            .expect("request");
        assert_eq!(
            r.clone()
                .oneshot(no_host)
                .await
                .expect("infallible")
                .status(),
            StatusCode::BAD_REQUEST
        );
        for uri in ["/%zz", "/a%2", "/%", "nokey"] {
            assert_eq!(
                call(&r, "PUT", uri, "v").await.0,
                StatusCode::BAD_REQUEST,
                "{uri}"
            );
        }
        assert!(prx.try_recv().is_err(), "nothing proposed");
        // Well-formed escapes, and a % in the query (Go does not check it there), are keys.
        for uri in ["/a%2Fb", "/%e2%82%ac", "/k?x=%zz"] {
            assert_eq!(call(&r, "PUT", uri, "v").await.0, StatusCode::NO_CONTENT);
            let proposed = prx.recv().await.expect("proposal");
            assert_eq!(proposed, crate::kvstore::encode(uri, b"v", 0));
        }
    }

    #[tokio::test]
    async fn an_absolute_form_target_is_the_whole_key() {
        let (r, mut prx, _c, _kvs) = app();
        let (status, _) = call(&r, "PUT", "http://127.0.0.1/abs", "v").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let proposed = prx.recv().await.expect("proposal");
        assert_eq!(
            proposed,
            crate::kvstore::encode("http://127.0.0.1/abs", b"v", 0)
        );
    }

    #[test]
    fn values_are_text_unless_they_hold_control_bytes() {
        assert_eq!(
            content_type(b"hello\tworld\r\n"),
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            content_type("<b>h\u{e9}</b>".as_bytes()),
            "text/plain; charset=utf-8"
        );
        assert_eq!(content_type(b""), "text/plain; charset=utf-8");
        assert_eq!(content_type(b"ab\x00c"), "application/octet-stream");
        // Only the first 512 bytes are looked at, as in Go.
        let mut v = vec![b'a'; 512];
        v.push(0);
        assert_eq!(content_type(&v), "text/plain; charset=utf-8");
    }
}
