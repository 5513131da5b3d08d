//! Whether a peer is reachable (etcd `peer_status.go`), plus the prober's last
//! round-trip time. Every sender and reader reports here after each attempt; only a
//! change of state is logged, so a dead peer costs one line, not one per message.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A point-in-time view of a peer, for status endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatusReport {
    /// The URL currently used to reach the peer.
    pub url: String,
    /// Whether the last stream/pipeline attempt succeeded.
    pub active: bool,
    /// When the peer last became active, if it is active.
    pub active_since: Option<SystemTime>,
    /// Round-trip time of the last successful probe of `/raft/probing`.
    pub last_rtt: Option<Duration>,
    /// Whether the last probe succeeded.
    pub probe_healthy: bool,
    /// Whether the peer's msgapp stream (our writer) is attached.
    pub msgapp_stream: bool,
    /// Whether the peer's message stream (our writer) is attached.
    pub message_stream: bool,
    /// Messages waiting in the peer's stream and pipeline queues.
    pub queued: usize,
}

#[derive(Debug)]
pub struct PeerStatus {
    local: u64,
    peer: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    since: Option<SystemTime>,
    last_rtt: Option<Duration>,
    probe_healthy: bool,
}

impl PeerStatus {
    pub fn new(local: u64, peer: u64) -> PeerStatus {
        PeerStatus {
            local,
            peer,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain fields, each written in one assignment: a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to the peer worked.
    pub fn activate(&self) {
        let mut s = self.lock();
        if s.since.is_none() {
            s.since = Some(SystemTime::now());
            tracing::info!(local = %format_args!("{:x}", self.local), peer = %format_args!("{:x}", self.peer), "peer became active");
        }
    }

    /// An attempt to reach the peer failed: `source` says which part of the
    /// transport (e.g. "stream message reader"), `err` what happened.
    pub fn deactivate(&self, source: &str, err: &dyn std::fmt::Display) {
        let mut s = self.lock();
        if s.since.take().is_some() {
            tracing::warn!(local = %format_args!("{:x}", self.local), peer = %format_args!("{:x}", self.peer), source, error = %err, "peer became inactive (message send to peer failed)");
        } else {
            tracing::debug!(peer = %format_args!("{:x}", self.peer), source, error = %err, "peer still inactive");
        }
    }

    pub fn is_active(&self) -> bool {
        self.lock().since.is_some()
    }

    pub fn active_since(&self) -> Option<SystemTime> {
        self.lock().since
    }

    /// The prober's result: `Some(rtt)` on a healthy answer, `None` on failure.
    pub fn record_probe(&self, rtt: Option<Duration>) {
        let mut s = self.lock();
        s.probe_healthy = rtt.is_some();
        if rtt.is_some() {
            s.last_rtt = rtt;
        }
    }

    /// The status part of a report; the peer fills in streams and queues.
    pub fn report(&self, url: String) -> PeerStatusReport {
        let s = self.lock();
        PeerStatusReport {
            url,
            active: s.since.is_some(),
            active_since: s.since,
            last_rtt: s.last_rtt,
            probe_healthy: s.probe_healthy,
            msgapp_stream: false,
            message_stream: false,
            queued: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        let s = PeerStatus::new(1, 2);
        assert!(!s.is_active());
        s.activate();
        let since = s.active_since();
        assert!(since.is_some());
        s.activate(); // already active: keeps the first time
        assert_eq!(s.active_since(), since);
        s.deactivate("test", &"boom");
        assert_eq!(s.active_since(), None);
        s.record_probe(Some(Duration::from_millis(3)));
        s.record_probe(None);
        let r = s.report("http://x".into());
        assert_eq!(
            (r.last_rtt, r.probe_healthy, r.active),
            (Some(Duration::from_millis(3)), false, false)
        );
    }
}
