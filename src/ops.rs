//! Operations endpoints on the raft (peer) listener, so that no key of the KV port is taken:
//! `GET /health`, `GET /status`, `GET /metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::sync::watch;

use crate::rafthttp::Transport;

/// What the raft loop publishes after every turn.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct NodeStatus {
    /// This node's id.
    pub id: u64,
    /// The leader's id, 0 if none is known.
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// `leader`, `follower`, `candidate` or `pre-candidate`.
    pub state: &'static str,
    /// Highest index known committed (for a follower: the leader's commit it last heard).
    pub commit: u64,
    /// Highest index applied (published to the store).
    pub applied: u64,
    /// Index of the newest snapshot.
    pub snapshot_index: u64,
    /// Bytes of WAL segments on disk.
    pub wal_bytes: u64,
    /// Every member this node knows: id and raft URL.
    pub members: Vec<(u64, String)>,
    /// Ids in the applied raft configuration (voters and learners), sorted.
    pub voters: Vec<u64>,
    /// Ids removed from the cluster; they cannot be added again.
    pub removed: Vec<u64>,
}

#[derive(Clone)]
struct Ops {
    status: watch::Receiver<NodeStatus>,
    transport: Transport,
}

/// The router for `/health`, `/status` and `/metrics`.
pub fn router(status: watch::Receiver<NodeStatus>, transport: Transport) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics))
        .with_state(Ops { status, transport })
}

/// Healthy when a leader is known and this node applied everything it knows is committed
/// (etcd's `/health` shape). With check_quorum, a leader cut off from its quorum steps down
/// within an election timeout, and so stops reporting healthy.
async fn health(State(ops): State<Ops>) -> Response {
    let st = ops.status.borrow().clone();
    let reason = if st.leader == 0 {
        Some("no leader".to_string())
    } else if st.applied < st.commit {
        Some(format!("applied {} of {} committed", st.applied, st.commit))
    } else {
        None
    };
    let (code, body) = match reason {
        None => (StatusCode::OK, serde_json::json!({"health": "true"})),
        Some(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"health": "false", "reason": r}),
        ),
    };
    (code, axum::Json(body)).into_response()
}

#[derive(Serialize)]
struct PeerView {
    id: u64,
    url: String,
    active: bool,
    active_since_unix_ms: Option<u128>,
    last_rtt_ms: Option<f64>,
    streams_attached: bool,
    queued_messages: usize,
}

async fn status_json(State(ops): State<Ops>) -> Response {
    let st = ops.status.borrow().clone();
    let peers: Vec<PeerView> = st
        .members
        .iter()
        .filter(|(id, _)| *id != st.id)
        .map(|(id, url)| match ops.transport.peer_status(*id) {
            Some(p) => PeerView {
                id: *id,
                url: p.url,
                active: p.active,
                active_since_unix_ms: p
                    .active_since
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis()),
                last_rtt_ms: p.last_rtt.map(|d| d.as_secs_f64() * 1000.0),
                streams_attached: p.msgapp_stream && p.message_stream,
                queued_messages: p.queued,
            },
            None => PeerView {
                id: *id,
                url: url.clone(),
                active: false,
                active_since_unix_ms: None,
                last_rtt_ms: None,
                streams_attached: false,
                queued_messages: 0,
            },
        })
        .collect();
    let mut v = serde_json::to_value(&st).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.remove("members");
        obj.insert(
            "peers".into(),
            serde_json::to_value(peers).unwrap_or_default(),
        );
    }
    axum::Json(v).into_response()
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}
