//! Prometheus metrics, served as text on `GET /metrics` of the raft listener.
//!
//! One registry per process (a process is one node). Names start with `raftexample_`.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric of this process.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<T: prometheus::core::Collector + Clone + 'static>(m: T) -> T {
    // Registration fails only for a duplicate name, which the statics below rule out.
    let _ = REGISTRY.register(Box::new(m.clone()));
    m
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("invariant: valid metric name"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("invariant: valid metric name"))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("invariant: valid metric"))
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("invariant: valid metric"),
    )
}

/// Proposals handed to raft.
pub static PROPOSALS_ACCEPTED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "raftexample_proposals_accepted_total",
        "Proposals handed to raft.",
    )
});
/// Proposals raft refused.
pub static PROPOSALS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "raftexample_proposals_dropped_total",
        "Proposals raft dropped.",
    )
});
/// Committed entries published to the key-value store.
pub static ENTRIES_COMMITTED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "raftexample_entries_committed_total",
        "Committed entries published to the store.",
    )
});
/// Key-value pairs applied to the map.
pub static ENTRIES_APPLIED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "raftexample_entries_applied_total",
        "Key-value writes applied to the map.",
    )
});
/// Raft index of the last published entry.
pub static APPLIED_INDEX: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "raftexample_applied_index",
        "Raft index applied on this node.",
    )
});
/// Leader changes seen.
pub static LEADER_CHANGES: LazyLock<IntCounter> =
    LazyLock::new(|| counter("raftexample_leader_changes_total", "Leader changes seen."));
/// 1 while this node leads.
pub static IS_LEADER: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("raftexample_is_leader", "1 if this node is the leader."));
/// Time of WAL writes that fsync.
pub static WAL_FSYNC_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "raftexample_wal_fsync_duration_seconds",
        "Duration of WAL saves that fsync.",
        prometheus::exponential_buckets(0.0001, 2.0, 16).expect("invariant: valid buckets"),
    )
});
/// New entries per Ready.
pub static READY_ENTRIES: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "raftexample_ready_batch_entries",
        "Entries persisted per Ready.",
        prometheus::exponential_buckets(1.0, 2.0, 14).expect("invariant: valid buckets"),
    )
});
/// Snapshots this node took.
pub static SNAPSHOTS_TAKEN: LazyLock<IntCounter> =
    LazyLock::new(|| counter("raftexample_snapshots_taken_total", "Snapshots taken."));
/// Snapshots sent to followers (by outcome).
pub static SNAPSHOTS_SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "raftexample_snapshots_sent_total",
        "Snapshots sent to peers.",
        &["outcome"],
    )
});
/// Snapshots received from a leader.
pub static SNAPSHOTS_RECEIVED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "raftexample_snapshots_received_total",
        "Snapshots installed.",
    )
});
/// Raft messages handed to the transport, by peer.
pub static PEER_SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "raftexample_peer_messages_sent_total",
        "Messages sent, by peer.",
        &["peer"],
    )
});
/// Raft messages dropped because a peer's queue was full, by peer.
pub static PEER_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "raftexample_peer_messages_dropped_total",
        "Messages dropped (queue full or peer down), by peer.",
        &["peer"],
    )
});
/// Stream (re)connections, by peer.
pub static PEER_RECONNECTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "raftexample_peer_stream_reconnects_total",
        "Stream connections established, by peer.",
        &["peer"],
    )
});
/// Raft messages from the network refused by `raft_node::guard`.
pub static MESSAGES_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "raftexample_peer_messages_refused_total",
        "Raft messages from the network dropped as invalid (the log says why).",
    )
});
/// Key-value API requests, by method and status code.
pub static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "raftexample_http_requests_total",
        "Key-value API requests, by method and status code.",
        &["method", "code"],
    )
});

/// All metrics in Prometheus text format.
pub fn render() -> String {
    // Touch every static so that a metric appears (at zero) before its first event.
    let _ = (
        &*PROPOSALS_ACCEPTED,
        &*PROPOSALS_DROPPED,
        &*ENTRIES_COMMITTED,
        &*ENTRIES_APPLIED,
        &*APPLIED_INDEX,
        &*LEADER_CHANGES,
        &*IS_LEADER,
        &*WAL_FSYNC_SECONDS,
        &*READY_ENTRIES,
        &*SNAPSHOTS_TAKEN,
        &*SNAPSHOTS_SENT,
        &*SNAPSHOTS_RECEIVED,
        &*PEER_SENT,
        &*PEER_DROPPED,
        &*PEER_RECONNECTS,
        &*MESSAGES_REFUSED,
        &*HTTP_REQUESTS,
    );
    let mut buf = Vec::new();
    // Encoding into memory only fails on invalid metric families, which we never build.
    let _ = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
