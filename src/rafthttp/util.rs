//! Small shared pieces: hex member ids, header names, versions and the
//! compatibility check every handler runs first (etcd `util.go`, `http.go:501-558`).
//!
//! Ids travel as lowercase hex without leading zeros (etcd `types.ID.String()`), so
//! raftexample's cluster id `0x1000` is the header value `1000` and member 10 is `a`.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::uri::InvalidUri;
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use raft::eraftpb::{Message, MessageType};

/// The version this port claims on the wire. Go peers reject anything that is not
/// valid semver, and refuse streams from peers older than the stream types need.
pub const VERSION: &str = "3.4.23";
/// The oldest cluster version this port can join (etcd `version.MinClusterVersion`).
pub const MIN_CLUSTER_VERSION: &str = "3.0.0";
/// What a peer that sends no version header is assumed to run (etcd's default).
const DEFAULT_VERSION: &str = "2.0.0";

/// Header names, as etcd spells them (header lookups are case-insensitive).
/// The sender's member id, hex.
pub const HDR_FROM: &str = "x-server-from";
/// The sender's etcd version (semver).
pub const HDR_SERVER_VERSION: &str = "x-server-version";
/// The oldest etcd version the sender's cluster accepts (semver).
pub const HDR_MIN_CLUSTER_VERSION: &str = "x-min-cluster-version";
/// The cluster id, hex.
pub const HDR_CLUSTER_ID: &str = "x-etcd-cluster-id";
/// The member a stream dial is meant for, hex.
pub const HDR_RAFT_TO: &str = "x-raft-to";

/// Formats an id as etcd does: lowercase hex, no leading zeros, `0` for zero.
pub fn id_to_hex(id: u64) -> String {
    format!("{id:x}")
}

/// Parses a hex id as etcd's `types.IDFromString` (`strconv.ParseUint(s, 16, 64)`).
/// Returns `None` for empty strings, signs, non-hex digits and overflow.
pub fn parse_id(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Why a request failed the cluster compatibility check. The `Display` strings are
/// the exact 412 bodies Go clients compare against (`http.go:40-45`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CompatError {
    /// Versions do not overlap.
    #[error("incompatible version")]
    IncompatibleVersion,
    /// The sender belongs to another cluster.
    #[error("cluster ID mismatch")]
    ClusterIdMismatch,
}

/// (major, minor) of a semver string, or `None` if it is not valid semver.
/// etcd parses with `semver.Must`, which panics (and so kills the request) on
/// invalid input; we answer 412 instead.
pub fn major_minor(v: &str) -> Option<(u64, u64)> {
    semver::Version::parse(v).ok().map(|v| (v.major, v.minor))
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The remote's server version from a header map, defaulting as etcd does.
pub fn remote_version(h: &HeaderMap) -> &str {
    header_str(h, HDR_SERVER_VERSION).unwrap_or(DEFAULT_VERSION)
}

/// The check every raft handler runs before anything else: the sender's version
/// must be at least our minimum cluster version, its minimum cluster version at
/// most our version (both compared on major.minor), and its cluster id ours.
pub fn check_cluster_compat(h: &HeaderMap, cluster_hex: &str) -> Result<(), CompatError> {
    let server = major_minor(remote_version(h));
    let min_cluster =
        major_minor(header_str(h, HDR_MIN_CLUSTER_VERSION).unwrap_or(DEFAULT_VERSION));
    let (Some(server), Some(min_cluster)) = (server, min_cluster) else {
        return Err(CompatError::IncompatibleVersion);
    };
    let local = major_minor(VERSION).expect("invariant: VERSION is valid semver");
    let local_min = major_minor(MIN_CLUSTER_VERSION).expect("invariant: valid semver");
    if server < local_min || min_cluster > local {
        return Err(CompatError::IncompatibleVersion);
    }
    if header_str(h, HDR_CLUSTER_ID) != Some(cluster_hex) {
        return Err(CompatError::ClusterIdMismatch);
    }
    Ok(())
}

/// Whether a stream dialer may use a stream whose server answered with version
/// `rv` (etcd `supportedStream`, `stream.go:634-640`): peers at our major.minor or
/// newer always can; older ones only from 2.1 on (2.0 had neither stream type).
pub fn stream_supported(rv: &str) -> bool {
    major_minor(rv).is_some_and(|v| v >= (2, 1))
}

/// A link heartbeat is a `MsgHeartbeat` from 0 to 0: it keeps an idle stream's read
/// deadline from firing and is never handed to raft (etcd `stream.go:88-95`).
pub fn is_link_heartbeat(m: &Message) -> bool {
    m.msg_type == MessageType::MsgHeartbeat && m.from == 0 && m.to == 0
}

/// The link heartbeat message itself.
pub fn link_heartbeat() -> Message {
    let mut m = Message::new();
    m.msg_type = MessageType::MsgHeartbeat;
    m
}

/// How long to wait for a connection or for response headers. The Go transport
/// has no dial timeout in raftexample; on loopback a refused dial is immediate and
/// this only bounds a peer that accepts but never answers.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keep-alive on every raft connection, as raftexample's `listener.go`.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(180);

/// Request bodies: a protobuf, a snapshot in two pieces, or nothing.
pub type ReqBody = BoxBody<Bytes, Infallible>;
/// One client for all peers. Each in-flight HTTP/1 request holds its own
/// connection, so every long-lived stream gets a dedicated one while pipeline
/// posts reuse idle keep-alive connections from the pool.
pub type HttpClient = Client<HttpConnector, ReqBody>;

/// The client for pipeline posts, probes and snapshots: keep-alive, `TCP_NODELAY`.
pub fn new_client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(DIAL_TIMEOUT));
    conn.set_keepalive(Some(TCP_KEEPALIVE));
    Client::builder(TokioExecutor::new())
        // Below the server's idle limit (`http_server::HEADER_READ_TIMEOUT`, 30 s), so this
        // side drops an idle connection before the peer closes it under a new request.
        .pool_idle_timeout(Duration::from_secs(20))
        .build(conn)
}

/// A request to `path` at the scheme and host of the peer URL `base`, carrying the headers
/// every raft request has (etcd `createPostRequest` and the stream `dial`). As in etcd, a path
/// in the peer URL is replaced, so `http://host:port/` works like `http://host:port`.
pub fn raft_request(
    method: Method,
    base: &str,
    path: &str,
    from_hex: &str,
    cluster_hex: &str,
) -> Result<axum::http::request::Builder, TransportError> {
    let bad = |e: &dyn std::fmt::Display| TransportError::BadUrl {
        url: base.to_owned(),
        reason: e.to_string(),
    };
    let peer: Uri = base.parse().map_err(|e: InvalidUri| bad(&e))?;
    let (Some(scheme), Some(authority)) = (peer.scheme(), peer.authority()) else {
        return Err(bad(&"not an absolute http://host:port URL"));
    };
    let uri = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|e| bad(&e))?;
    Ok(Request::builder()
        .method(method)
        .uri(uri)
        .header(HDR_FROM, from_hex)
        .header(HDR_SERVER_VERSION, VERSION)
        .header(HDR_MIN_CLUSTER_VERSION, MIN_CLUSTER_VERSION)
        .header(HDR_CLUSTER_ID, cluster_hex))
}

/// Why sending to a peer failed. Logged by the peer's status (on transitions)
/// and turned into `report_unreachable` for raft.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A peer URL does not parse.
    #[error("invalid peer URL {url:?} ({reason}); fix the peer list")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The peer has no URL to send to.
    #[error("peer has no URL")]
    NoUrl,
    /// Building the HTTP request failed.
    #[error("could not build request: {0}")]
    Request(#[from] axum::http::Error),
    /// The request failed (connection refused, reset...).
    #[error("HTTP request failed: {0}")]
    Http(#[from] hyper_util::client::legacy::Error),
    /// The response body could not be read.
    #[error("reading the response failed: {0}")]
    Body(#[from] hyper::Error),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// 412: incompatible version or cluster id.
    #[error("peer refused the request: {0} (check versions and cluster id)")]
    Precondition(String),
    /// 403/410: this member was removed.
    #[error("peer says this member was removed from the cluster")]
    MemberRemoved,
    /// 404: the peer does not know this member.
    #[error("peer does not know this member (is it in the peer's cluster list?)")]
    NotFound,
    /// The peer is too old for this stream type.
    #[error("peer runs version {0}, which has no stream of this type")]
    UnsupportedStream(String),
    /// Any other status.
    #[error("unexpected HTTP status {0}")]
    Status(StatusCode),
    /// The message could not be encoded.
    #[error("could not encode message: {0}")]
    Encode(#[from] super::msg_codec::CodecError),
}

/// Sends `req` and maps the answer to a POST result as etcd's `checkPostResponse`:
/// only 204 is success; 403 means this member was removed; a 412 carries its reason.
/// `timeout` bounds the wait for the response headers, which the receiver sends
/// only after raft took the message.
pub async fn post(
    client: &HttpClient,
    req: Request<ReqBody>,
    timeout: Duration,
) -> Result<(), TransportError> {
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| TransportError::Timeout(timeout))??;
    match resp.status() {
        StatusCode::NO_CONTENT => Ok(()),
        StatusCode::FORBIDDEN => Err(TransportError::MemberRemoved),
        StatusCode::PRECONDITION_FAILED => {
            Err(TransportError::Precondition(error_text(resp).await))
        }
        s => Err(TransportError::Status(s)),
    }
}

/// The (short) text of an error response, without the trailing newline.
pub async fn error_text(resp: axum::http::Response<hyper::body::Incoming>) -> String {
    // Error bodies are a line of text; cap what a misbehaving peer can make us read.
    let limited = http_body_util::Limited::new(resp.into_body(), 4096);
    match tokio::time::timeout(DIAL_TIMEOUT, limited.collect()).await {
        Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes())
            .trim_end_matches('\n')
            .to_string(),
        _ => String::from("<unreadable body>"),
    }
}

/// A whole body as a request body.
pub fn full_body(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).boxed()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_path_in_the_peer_url_is_replaced() {
        for base in [
            "http://10.0.0.1:2380",
            "http://10.0.0.1:2380/",
            "http://10.0.0.1:2380/x/y",
        ] {
            let req = super::raft_request(super::Method::POST, base, "/raft", "1", "1000")
                .expect("valid")
                .body(())
                .expect("request");
            assert_eq!(req.uri().to_string(), "http://10.0.0.1:2380/raft", "{base}");
        }
        assert!(
            super::raft_request(super::Method::POST, "10.0.0.1:2380", "/raft", "1", "1000")
                .is_err()
        );
    }

    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn ids_are_lowercase_hex_without_leading_zeros() {
        assert_eq!(id_to_hex(0x1000), "1000");
        assert_eq!(id_to_hex(10), "a");
        assert_eq!(id_to_hex(0), "0");
        assert_eq!(parse_id("a"), Some(10));
        assert_eq!(parse_id("00A"), Some(10));
        assert_eq!(parse_id("ffffffffffffffff"), Some(u64::MAX));
        for bad in ["", "+a", "-1", "x", "10000000000000000", "a b"] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn compat_check_matches_etcd() {
        let ok = [
            (HDR_SERVER_VERSION, VERSION),
            (HDR_MIN_CLUSTER_VERSION, MIN_CLUSTER_VERSION),
            (HDR_CLUSTER_ID, "1000"),
        ];
        assert_eq!(check_cluster_compat(&headers(&ok), "1000"), Ok(()));
        assert_eq!(
            check_cluster_compat(&headers(&ok), "1001"),
            Err(CompatError::ClusterIdMismatch)
        );
        // Missing versions default to 2.0.0, which is too old.
        assert_eq!(
            check_cluster_compat(&headers(&[(HDR_CLUSTER_ID, "1000")]), "1000"),
            Err(CompatError::IncompatibleVersion)
        );
        for (server, min) in [
            ("garbage", "3.0.0"),
            ("3.4.23", "3.9.0"),
            ("2.3.0", "2.0.0"),
        ] {
            let h = headers(&[
                (HDR_SERVER_VERSION, server),
                (HDR_MIN_CLUSTER_VERSION, min),
                (HDR_CLUSTER_ID, "1000"),
            ]);
            assert_eq!(
                check_cluster_compat(&h, "1000"),
                Err(CompatError::IncompatibleVersion),
                "{server} {min}"
            );
        }
        // A newer patch or minor release is fine.
        let h = headers(&[
            (HDR_SERVER_VERSION, "3.5.9"),
            (HDR_MIN_CLUSTER_VERSION, "3.0.0"),
            (HDR_CLUSTER_ID, "1000"),
        ]);
        assert_eq!(check_cluster_compat(&h, "1000"), Ok(()));
        assert_eq!(
            CompatError::ClusterIdMismatch.to_string(),
            "cluster ID mismatch"
        );
    }

    #[test]
    fn stream_support_by_version() {
        assert!(stream_supported("3.4.23"));
        assert!(stream_supported("3.6.0"));
        assert!(stream_supported("2.1.0"));
        assert!(!stream_supported("2.0.0"));
        assert!(!stream_supported("nonsense"));
    }
}
